"""Read records from JSONL and normalise every supported shape to chat `messages`.

Each record keeps where it came from (`file:line`) so any problem found later, here or while
templating, can name the exact line to fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from sftjax.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    """One training example, normalised. Chat-like formats fill `messages`; plain text fills `text`
    (every token is a target). Classification and token-classification records are rendered as
    chat (the reply is the label / the tagged entities) and also keep their raw fields so task
    heads can use them."""

    where: str  # "file:line", "file#row" or "recipe:NAME#index": what an error message names
    messages: tuple[dict, ...] = ()
    text: str | None = None
    label: str | None = None
    tokens: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None


def read_jsonl(path: str, fmt: str = "auto") -> list[Record]:
    """All records of a JSONL file as chat messages; a bad line raises naming path:line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: data file not found")
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            out.append(Record(where, to_messages(obj, fmt, where)))
    if not out:
        raise UserError(f"{path}: no records (the file is empty)")
    return out


def to_messages(obj, fmt: str, where: str) -> tuple[dict, ...]:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if fmt == "auto":
        fmt = "messages" if "messages" in obj else "alpaca" if "instruction" in obj else ""
        if not fmt:
            raise UserError(f"{where}: cannot tell the record format: expected a 'messages' list or "
                            f"'instruction'/'output' fields (found keys: {', '.join(obj) or 'none'})")
    if fmt == "messages":
        return _messages(obj, where)
    if fmt == "alpaca":
        return _alpaca(obj, where)
    raise UserError(f"data.format: {fmt!r} is not one of auto, messages, alpaca")


def _text(obj: dict, key: str, where: str, required: bool = True) -> str:
    v = obj.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        what = "missing" if v is None else f"a {type(v).__name__}, not a string"
        raise UserError(f"{where}: field {key!r} is {what}")
    if required and not v.strip():
        raise UserError(f"{where}: field {key!r} is empty")
    return v


def _messages(obj: dict, where: str) -> tuple[dict, ...]:
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise UserError(f"{at} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise UserError(f"{at}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        out.append({"role": role, "content": _text(m, "content", at)})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: no assistant message, so nothing to train on")
    return tuple(out)


def _alpaca(obj: dict, where: str) -> tuple[dict, ...]:
    instruction = _text(obj, "instruction", where)
    extra = _text(obj, "input", where, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return ({"role": "user", "content": prompt}, {"role": "assistant", "content": _text(obj, "output", where)})
