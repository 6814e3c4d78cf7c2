"""Chat template -> token ids + a loss mask over every assistant turn.

The template is rendered once for the whole conversation. By definition, an assistant turn's
character span starts where the template's generation prompt for it ends (render of the turns
before it, with `add_generation_prompt`) and ends where the conversation rendered up to and
including it ends (so it covers the reply and the end-of-turn marker: the model learns to stop).
Tokens are then marked by their character offsets, never by re-tokenising substrings, so the
mask is exact for any BPE merge at a boundary.

Rendering two prefixes per reply costs time quadratic in the number of turns, so long chats take
a faster route: one more render with each message's content replaced by a sentinel locates every
content and the template text around it; the result must rebuild the real rendering exactly, the
end-of-turn marker must follow every reply, and the first and last replies' spans are checked
against the definition. Any mismatch falls back to the definition for every turn.
"""

from __future__ import annotations

import re

import numpy as np

from sftjax.data.records import Record
from sftjax.errors import UserError


def render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters: never in real text (checked)
_SENTINEL = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
_FOOTERS: dict[str, str | None] = {}  # chat template -> text that closes an assistant turn


def assistant_spans(tokenizer, record: Record) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of every assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("data.chat_template: the tokenizer has no chat template; set data.chat_template to "
                        "chatml, llama-3, alpaca or a .jinja file")
    msgs = record.messages
    text = render(tokenizer, msgs)
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    checked = {i: exact_span(tokenizer, record, i, text) for i in {turns[0], turns[-1]}} if turns else {}
    fast = fast_spans(tokenizer, msgs, text) if len(turns) > 2 else None
    if fast is not None and all(fast[turns.index(i)] == span for i, span in checked.items()):
        return text, fast
    return text, [checked[i] if i in checked else exact_span(tokenizer, record, i, text) for i in turns]


def exact_span(tokenizer, record: Record, i: int, text: str) -> tuple[int, int]:
    """Span of assistant turn `i` by the definition (two renders of prefixes of the conversation)."""
    msgs = record.messages
    # (A conversation that opens with a reply has no prompt to render: its span starts at 0.)
    start = len(render(tokenizer, msgs[:i], add_generation_prompt=True)) if i else 0
    upto = text if i + 1 == len(msgs) else render(tokenizer, msgs[: i + 1])
    end = len(upto.rstrip())
    if not text.startswith(upto) or not upto[start:].lstrip().startswith(msgs[i]["content"].strip()[:16]):
        raise UserError(f"{record.where}: the chat template does not render this conversation as a "
                        "sequence of turns (prefix mismatch), so assistant tokens cannot be located")
    return start, end


def fast_spans(tokenizer, msgs, text: str) -> list[tuple[int, int]] | None:
    """Spans of every assistant turn from one sentinel render, or None if the template does not
    render contents verbatim between fixed template text."""
    footer = _footer(tokenizer)
    if not footer or any(_OPEN in m["content"] or _CLOSE in m["content"] for m in msgs):
        return None
    marked = render(tokenizer, [dict(m, content=f"{_OPEN}{i}{_CLOSE}") for i, m in enumerate(msgs)])
    pieces = _SENTINEL.split(marked)  # glue, index, glue, index, ..., glue
    if pieces[1::2] != [str(i) for i in range(len(msgs))]:
        return None
    rebuilt, starts, pos = [], [], 0
    for k, glue in enumerate(pieces[0::2]):
        rebuilt.append(glue)
        pos += len(glue)
        if k < len(msgs):
            starts.append(pos)
            rebuilt.append(msgs[k]["content"])
            pos += len(msgs[k]["content"])
    if "".join(rebuilt) != text:
        return None
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            end = starts[i] + len(m["content"])
            if not text.startswith(footer, end):
                return None
            spans.append((starts[i], end + len(footer)))
    return spans


def _footer(tokenizer) -> str | None:
    """What the template writes right after a reply's content and before any whitespace."""
    template = tokenizer.chat_template
    if template not in _FOOTERS:
        probe = [{"role": "user", "content": f"{_OPEN}u{_CLOSE}"}, {"role": "assistant", "content": f"{_OPEN}a{_CLOSE}"}]
        try:
            out = render(tokenizer, probe).rstrip()
            tail = out.split(f"{_OPEN}a{_CLOSE}")
            _FOOTERS[template] = tail[1] if len(tail) == 2 else None
        except Exception:  # a template that rejects the probe: use the definition only
            _FOOTERS[template] = None
    return _FOOTERS[template]


def encode(tokenizer, record: Record, loss_on: str = "assistant") -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], loss mask bool [n]); mask[i] says token i is a target.

    `loss_on`: "assistant" (every assistant turn), "last_assistant" (only the final one) or
    "all" (every token). Plain-text records train on every token, with the tokenizer's
    special tokens and a closing end-of-sequence token so the model learns where text ends.
    """
    if record.text is not None:
        ids = list(tokenizer(record.text, add_special_tokens=True)["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return np.asarray(ids, np.int32), np.ones(len(ids), bool)
    text, spans = assistant_spans(tokenizer, record)
    if loss_on == "last_assistant":
        spans = spans[-1:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    if loss_on == "all":
        return ids, np.ones(len(ids), bool)
    off = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    s, e = off[:, :1], off[:, 1:]
    # A token is a target when it starts inside a reply's span: one that straddles the end (a BPE
    # merge across the end-of-turn marker) is what the model must emit to close the turn.
    inside = (s >= np.asarray([a for a, _ in spans])) & (s < np.asarray([b for _, b in spans]))
    return ids, (e[:, 0] > s[:, 0]) & inside.any(1)


def prompt_ids(tokenizer, messages: list[dict]) -> np.ndarray:
    """Token ids of a conversation up to where the next assistant reply starts."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
