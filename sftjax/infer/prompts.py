"""Prompt files for `sftjax generate --prompts`: JSONL in, the same lines plus "output" out.

Each line is {"prompt": "..."} or {"messages": [{role, content}, ...]}; other keys pass through to
the output untouched, so ids and references stay beside the replies. The whole file is read and
checked before the model loads, so a bad line (named `file:line`) costs no loading time. Prompts
are answered in batches of a fixed size, the last one padded with repeats, so every batch of a
file shares one compiled shape per prompt-length bucket.
"""

from __future__ import annotations

import json
import os

from sftjax.data.formats import _messages, _text  # the training data's own checks of these fields
from sftjax.errors import UserError
from sftjax.infer.generate import chat
from sftjax.infer.sample import Sampling


def read_prompts(path: str, system: str | None = None) -> list[tuple[dict, list[dict]]]:
    """(the line's object, the conversation to reply to) for each non-blank line of `path`.

    Raises:
        UserError: the file cannot be read, is empty, or a line is not JSON or has neither field.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts: cannot read {path} ({e})") from None
    head = [{"role": "system", "content": system}] if system else []
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
            raise UserError(f'{where}: expected an object with "prompt": "..." or "messages": [...] (one of them)')
        if "prompt" in obj:
            out.append((obj, head + [{"role": "user", "content": _text(obj, "prompt", where)}]))
        else:
            out.append((obj, _messages(obj, where)))
    if not out:
        raise UserError(f"--prompts: {path} holds no prompts")
    return out


def check_output(path: str) -> None:
    """Fail now, naming --output, if `path` cannot be written (before the model loads)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"--output: {path} is a folder; give a file path")
    if not os.path.isdir(folder):
        raise UserError(f"--output: folder {folder} does not exist")
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        raise UserError(f"--output: cannot write {path} (permission denied)")


def reply_all(model, params, tokenizer, items: list[tuple[dict, list[dict]]], max_new_tokens: int,
              sampling: Sampling, batch_size: int = 8) -> list[dict]:
    """Each item's object with "output": the reply to its conversation."""
    out = []
    for start in range(0, len(items), batch_size):
        batch = items[start: start + batch_size]
        convs = [c for _, c in batch]
        convs += [convs[-1]] * (batch_size - len(convs))  # keep the compiled batch shape
        replies = chat(model, params, tokenizer, convs, max_new_tokens, sampling)
        out += [dict(obj, output=r) for (obj, _), r in zip(batch, replies, strict=False)]
    return out


def write_outputs(path: str | None, rows: list[dict]) -> None:
    """JSONL to `path`, or to standard output if None."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path is None:
        print(text, end="")
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
