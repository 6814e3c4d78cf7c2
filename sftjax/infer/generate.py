"""Greedy decoding with a key/value cache.

Prompts are left-padded to a common length so every row writes its next token into the same
cache slot; padding slots are masked out and positions count real tokens only, so a padded row
decodes exactly as it would alone. Two compiled shapes: the prompt (prefill) and one token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.models.llama import init_cache


def greedy(model, params, prompts: list[np.ndarray], max_new_tokens: int, eos_id: int | None,
           pad_id: int = 0) -> list[np.ndarray]:
    """Generated token ids (without the prompt, up to and including EOS) for each prompt."""
    b = len(prompts)
    p_len = -(-max(len(p) for p in prompts) // 8) * 8
    slots = p_len + max_new_tokens
    ids = np.full((b, p_len), pad_id, np.int32)
    valid = np.zeros((b, slots), bool)
    for i, p in enumerate(prompts):
        ids[i, p_len - len(p):] = p
        valid[i, p_len - len(p): p_len] = True
    positions = np.maximum(np.cumsum(valid[:, :p_len], axis=1) - 1, 0).astype(np.int32)
    last = positions[:, -1]

    @jax.jit
    def step(params, ids, valid, positions, cache, index):
        logits, cache = model.apply({"params": params}, ids, valid, positions, cache=cache, cache_index=index,
                                    head_positions=jnp.full((ids.shape[0], 1), ids.shape[1] - 1, jnp.int32))
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    cache = init_cache(model.cfg, b, slots)
    tok, cache = step(params, ids, valid, positions, cache, 0)
    out = np.zeros((b, max_new_tokens), np.int32)
    done = np.zeros(b, bool)
    n = 0
    for n in range(1, max_new_tokens + 1):
        t = np.asarray(tok)
        out[:, n - 1] = t
        done |= (t == eos_id) if eos_id is not None else False
        if n == max_new_tokens or done.all():
            break
        valid[:, p_len + n - 1] = True
        tok, cache = step(params, t[:, None], valid, (last + n)[:, None].astype(np.int32), cache, p_len + n - 1)
    result = []
    for i in range(b):
        row = out[i, :n]
        if eos_id is not None and (row == eos_id).any():
            row = row[: int(np.argmax(row == eos_id)) + 1]
        result.append(row)
    return result


def chat(model, params, tokenizer, conversations: list, max_new_tokens: int) -> list[str]:
    """Replies to conversations (a user prompt string or a list of messages), without specials."""
    from sftjax.data.chat import prompt_ids

    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": c}] if isinstance(c, str) else c)
               for c in conversations]
    outs = greedy(model, params, prompts, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
