"""Greedy decoding with a fixed-size token buffer.

Each new token re-runs the model over the whole buffer (no KV cache yet): one compiled shape,
simple and exact, and fast enough for the sample generations of small models on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def greedy(model, params, prompts: list[np.ndarray], max_new_tokens: int, eos_id: int | None,
           pad_id: int = 0) -> list[np.ndarray]:
    """Generated token ids (without the prompt, up to and including EOS) for each prompt."""
    longest = max(len(p) for p in prompts)
    length = -(-(longest + max_new_tokens) // 16) * 16
    buf = np.full((len(prompts), length), pad_id, np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    lens = np.array([len(p) for p in prompts], np.int32)
    start = lens.copy()
    done = np.zeros(len(prompts), bool)

    @jax.jit
    def next_token(params, buf, lens):
        valid = jnp.arange(buf.shape[1])[None, :] < lens[:, None]
        logits = model.apply({"params": params}, buf, valid)
        return jnp.argmax(logits[jnp.arange(buf.shape[0]), lens - 1], axis=-1)

    for _ in range(max_new_tokens):
        tok = np.asarray(next_token(params, buf, lens))
        for i in np.flatnonzero(~done):
            buf[i, lens[i]] = tok[i]
            lens[i] += 1
            done[i] = eos_id is not None and tok[i] == eos_id
        if done.all():
            break
    return [buf[i, start[i]: lens[i]] for i in range(len(prompts))]


def chat(model, params, tokenizer, conversations: list, max_new_tokens: int) -> list[str]:
    """Replies to conversations (a user prompt string or a list of messages), without specials."""
    from sftjax.data.chat import prompt_ids

    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": c}] if isinstance(c, str) else c)
               for c in conversations]
    outs = greedy(model, params, prompts, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
