"""`sftjax generate --chat`: an interactive conversation on standard input.

Each line the user types is a user turn; the reply is printed and both are kept, so the next turn
sees the whole conversation through the chat template training used. EOF or "/exit" ends it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sftjax.infer.generate import chat
from sftjax.infer.sample import Sampling


def converse(model, params, tokenizer, lines: Iterable[str], max_new_tokens: int, sampling: Sampling,
             system: str | None = None, say: Callable[[str], None] = print) -> list[dict]:
    """Reply to each line of `lines` in turn; returns the conversation (for tests and logs)."""
    history = [{"role": "system", "content": system}] if system else []
    for line in lines:
        text = line.strip()
        if text == "/exit":
            break
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply = chat(model, params, tokenizer, [history], max_new_tokens, sampling)[0]
        history.append({"role": "assistant", "content": reply})
        say(reply)
    return history

