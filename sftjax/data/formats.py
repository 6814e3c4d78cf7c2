"""Every supported record shape, turned into one `Record`, with errors that name the place and field.

Chat-like shapes (messages, ShareGPT, Alpaca, prompt/completion) become `messages`; plain text
stays `text` (every token is a target); classification and BIO token-classification rows are
rendered as a chat whose reply is the label or the list of entities, and keep their raw fields for
task heads. Prompt-side fields must be non-empty strings, because a record without a question is
a bug in the data. An empty *reply* is let through: the quality filter (`filters.py`) drops and
counts those, so a few empty outputs in a large file do not stop a run.
"""

from __future__ import annotations

from sftjax.data.records import Record
from sftjax.errors import UserError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "system": "system"}
FIELDS = {  # format -> its fields, as error messages show them
    "messages": "messages: [{role, content}, ...]",
    "sharegpt": "conversations: [{from, value}, ...]",
    "alpaca": "instruction, input (optional), output",
    "prompt_completion": "prompt, completion, system (optional)",
    "text": "text",
    "classification": "text, label",
    "tokens": "tokens, tags (or ner_tags)",
}
FORMATS = ("auto", *FIELDS)
# Keys that point `detect` to a format. Any one is enough, so a misspelt partner field is reported
# as missing from the intended format instead of as an unknown shape.
_MARKERS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
            "prompt_completion": ("prompt", "completion"), "tokens": ("tokens", "tags", "ner_tags"),
            "classification": ("label",), "text": ("text",)}


def detect(obj: dict, where: str) -> str:
    """The format of a row from its keys (`data.format=auto`).

    Raises:
        UserError: no format fits, or the keys fit more than one (e.g. Alpaca fields plus a
            rendered `text` column): then only the user knows which one to train on.
    """
    hits = [fmt for fmt, keys in _MARKERS.items() if any(k in obj for k in keys)]
    if "classification" in hits and "text" in hits:
        hits.remove("text")  # text + label is classification
    if len(hits) == 1:
        return hits[0]
    keys = ", ".join(map(str, obj)) or "none"
    if hits:
        fits = "; ".join(f"{f} ({FIELDS[f]})" for f in hits)
        raise UserError(f"{where}: ambiguous record format: the keys ({keys}) fit {fits}; "
                        "set data.format to the one to train on")
    known = "; ".join(f"{f} ({fields})" for f, fields in FIELDS.items())
    raise UserError(f"{where}: cannot tell the record format (found keys: {keys}); rename the fields to match "
                    f"one of the known formats: {known}")


def to_record(obj: dict, fmt: str, where: str, labels: tuple = (), instruction: str = "") -> Record:
    """One row in format `fmt` (or "auto") as a `Record`.

    Args:
        obj: the row, as a source yields it.
        fmt: one of `FORMATS`.
        where: the row's place (`file:line`, `file#row`), put first in every error message.
        labels: `data.labels`: the allowed class labels, or entity types / BIO tags; empty: any.
        instruction: `data.instruction`: the system prompt of classification and token records.
    """
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected an object with named fields, got {type(obj).__name__}")
    if fmt == "auto":
        fmt = detect(obj, where)
    if fmt not in FIELDS:
        raise UserError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "text":
        return Record(where, text=_text(obj, "text", where))
    if fmt == "classification":
        return _classification(obj, where, labels, instruction)
    if fmt == "tokens":
        return _tokens(obj, where, labels, instruction)
    turns = {"messages": _messages, "sharegpt": _sharegpt, "alpaca": _alpaca,
             "prompt_completion": _prompt_completion}[fmt](obj, where)
    return Record(where, _check_chat(turns, where))


def _text(obj: dict, key: str, where: str, required: bool = True, empty_ok: bool = False) -> str:
    """`obj[key]` as a string; missing only if not `required`, empty only if `empty_ok`."""
    v = obj.get(key)
    if v is None and not required:
        return ""
    if v is None:
        raise UserError(f"{where}: field {key!r} is missing")
    if not isinstance(v, str):
        raise UserError(f"{where}: field {key!r} must be a string, not {type(v).__name__}")
    if not empty_ok and not v.strip():
        raise UserError(f"{where}: field {key!r} is empty")
    return v


def _check_chat(turns: list[dict], where: str) -> tuple[dict, ...]:
    if not any(m["role"] == "assistant" for m in turns):
        raise UserError(f"{where}: no assistant message, so nothing to train on")
    return tuple(turns)


def _turn(role: str, m: dict, key: str, at: str) -> dict:
    # A reply may be empty (the quality filter counts it), a prompt may not; a system prompt may.
    return {"role": role, "content": _text(m, key, at, empty_ok=role != "user")}


def _turn_list(obj: dict, key: str, shape: str, where: str) -> list:
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: field {key!r} must be a non-empty list of {{{shape}}} objects")
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            raise UserError(f"{where}: {key}[{i}] is {type(m).__name__}, not an object")
    return turns


def _messages(obj: dict, where: str) -> list[dict]:
    out = []
    for i, m in enumerate(_turn_list(obj, "messages", "role, content", where)):
        at = f"{where}: messages[{i}]"
        if m.get("role") not in ROLES:
            raise UserError(f"{at}: unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
        out.append(_turn(m["role"], m, "content", at))
    return out


def _sharegpt(obj: dict, where: str) -> list[dict]:
    out = []
    for i, m in enumerate(_turn_list(obj, "conversations", "from, value", where)):
        at = f"{where}: conversations[{i}]"
        role = SHAREGPT_ROLES.get(m.get("from")) if isinstance(m.get("from"), str) else None
        if role is None:
            raise UserError(f"{at}: unknown 'from' value {m.get('from')!r} "
                            f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        out.append(_turn(role, m, "value", at))
    return out


def _alpaca(obj: dict, where: str) -> list[dict]:
    instruction = _text(obj, "instruction", where)
    extra = _text(obj, "input", where, required=False, empty_ok=True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(obj, "output", where, empty_ok=True)}]


def _prompt_completion(obj: dict, where: str) -> list[dict]:
    system = _text(obj, "system", where, required=False, empty_ok=True)
    return ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": _text(obj, "prompt", where)},
        {"role": "assistant", "content": _text(obj, "completion", where, empty_ok=True)}]


def _chat(instruction: str, user: str, reply: str) -> tuple[dict, ...]:
    system = ({"role": "system", "content": instruction},) if instruction else ()
    return (*system, {"role": "user", "content": user}, {"role": "assistant", "content": reply})


def _classification(obj: dict, where: str, labels: tuple, instruction: str) -> Record:
    text = _text(obj, "text", where)
    label = obj.get("label")
    if label is None:
        raise UserError(f"{where}: field 'label' is missing")
    if isinstance(label, bool) or not isinstance(label, int | str):
        raise UserError(f"{where}: field 'label' must be a string or an integer, not {type(label).__name__}")
    label = str(label)
    if not label.strip():
        raise UserError(f"{where}: field 'label' is empty")
    if labels and label not in map(str, labels):
        raise UserError(f"{where}: label {label!r} is not in data.labels ({', '.join(map(str, labels))})")
    return Record(where, _chat(instruction, text, label), label=label)


def _string_list(obj: dict, key: str, where: str) -> list[str]:
    v = obj.get(key)
    if v is None:
        raise UserError(f"{where}: field {key!r} is missing")
    if not isinstance(v, list | tuple):
        raise UserError(f"{where}: field {key!r} must be a list of strings, not {type(v).__name__}")
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise UserError(f"{where}: {key}[{i}] must be a string, not {type(s).__name__}")
    return list(v)


def _tokens(obj: dict, where: str, labels: tuple, instruction: str) -> Record:
    tokens = _string_list(obj, "tokens", where)
    tags = _string_list(obj, "tags" if "tags" in obj or "ner_tags" not in obj else "ner_tags", where)
    if not tokens:
        raise UserError(f"{where}: field 'tokens' is empty")
    if len(tokens) != len(tags):
        raise UserError(f"{where}: {len(tokens)} tokens but {len(tags)} tags; every token needs one tag")
    for i, tok in enumerate(tokens):
        if not tok.strip():
            raise UserError(f"{where}: tokens[{i}] is empty")
    spans = bio_spans(tags, where, tokens, tuple(map(str, labels)))
    reply = "\n".join(f"{kind}: {' '.join(tokens[a:b])}" for kind, a, b in spans) or "none"
    return Record(where, _chat(instruction, " ".join(tokens), reply), tokens=tuple(tokens), tags=tuple(tags))


def bio_spans(tags: list[str], where: str, tokens: list[str], labels: tuple[str, ...] = ()) -> list[tuple[str, int, int]]:
    """Entities `(type, start, end)` of a BIO (IOB2) tag sequence, checked tag by tag.

    Raises:
        UserError: a tag is not `O`, `B-TYPE` or `I-TYPE`; an `I-` tag does not continue a `B-`/`I-`
            tag of its type (IOB1 files need converting to IOB2 first); or a type is outside
            `labels` (which may list types, `PER`, or whole tags, `B-PER`).
    """
    spans: list[tuple[str, int, int]] = []
    prev = "O"
    for i, tag in enumerate(tags):
        at = f"{where}: tags[{i}] {tag!r} (token {tokens[i]!r})"
        head, _, kind = tag.partition("-")
        if tag != "O" and (head not in ("B", "I") or not kind):
            raise UserError(f"{at} is not a BIO tag (O, B-TYPE or I-TYPE)")
        if labels and tag != "O" and kind not in labels and tag not in labels:
            raise UserError(f"{at}: type {kind!r} is not in data.labels ({', '.join(labels)})")
        if head == "I":
            if prev == "O" or prev.partition("-")[2] != kind:
                after = "the start of the sentence" if i == 0 else repr(prev)
                raise UserError(f"{at} follows {after}; an I- tag must continue a B- or I- tag of the same type")
            spans[-1] = (kind, spans[-1][1], i + 1)
        elif head == "B":
            spans.append((kind, i, i + 1))
        prev = tag
    return spans
