"""Chat template -> token ids + a loss mask over every assistant turn.

The template is rendered once for the whole conversation; each assistant turn's character span is
found by rendering the conversation up to that turn with and without it (the template's own
generation prompt marks where the reply starts). Tokens are then marked by their character
offsets, never by re-tokenising substrings, so the mask is exact for any BPE merge at a boundary.
The span covers the reply and the template's end-of-turn token (so the model learns to stop).
"""

from __future__ import annotations

import numpy as np

from sftjax.data.records import Record
from sftjax.errors import UserError


def render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, record: Record) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of every assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("data.chat_template: the tokenizer has no chat template; set data.chat_template to "
                        "chatml, llama-3, alpaca or a .jinja file")
    msgs = record.messages
    text = render(tokenizer, msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        # (A conversation that opens with a reply has no prompt to render: its span starts at 0.)
        start = len(render(tokenizer, msgs[:i], add_generation_prompt=True)) if i else 0
        upto = render(tokenizer, msgs[: i + 1])
        end = len(upto.rstrip())
        if not text.startswith(upto) or not upto[start:].lstrip().startswith(m["content"].strip()[:16]):
            raise UserError(f"{record.where}: the chat template does not render this conversation as a "
                            "sequence of turns (prefix mismatch), so assistant tokens cannot be located")
        spans.append((start, end))
    return text, spans


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
