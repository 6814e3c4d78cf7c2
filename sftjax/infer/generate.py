"""Greedy decoding with a key/value cache, compiled once per model and shape.

Prompts are left-padded to a common length (a multiple of 8) so every row writes its next token
into the same cache slot; padding slots are masked out and positions count real tokens only, so a
padded row decodes exactly as it would alone. Two compiled shapes per (batch, prompt length,
max_new_tokens): the prompt (prefill) and one token. The jitted function belongs to a `Generator`
kept per model, so repeated calls (samples at every evaluation, `sftjax generate`) compile nothing.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.models.llama import init_cache

_GENERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Generator:
    """Greedy decoding for one model (an `Adapted`); get it with `generator(model)`."""

    def __init__(self, model):
        self._model = weakref.ref(model)  # the registry is keyed by the model: no strong cycle back to it
        self.traces = 0  # how many times the decoding step was traced (compiled), for tests and logs
        self._step = jax.jit(self._decode)

    @property
    def model(self):
        return self._model()

    def _decode(self, params, ids, valid, positions, cache, index):
        self.traces += 1
        last = jnp.full((ids.shape[0], 1), ids.shape[1] - 1, jnp.int32)
        logits, cache = self.model.apply(params, ids, valid, positions, cache=cache, cache_index=index,
                                         head_positions=last)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    def greedy(self, params, prompts: list[np.ndarray], max_new_tokens: int, eos_id: int | None,
               pad_id: int = 0) -> list[np.ndarray]:
        """Generated token ids (without the prompt, up to and including EOS) for each prompt."""
        b = len(prompts)
        p_len = -(-max(len(p) for p in prompts) // 8) * 8
        ids = np.full((b, p_len), pad_id, np.int32)
        valid = np.zeros((b, p_len + max_new_tokens), bool)
        for i, p in enumerate(prompts):
            ids[i, p_len - len(p):] = p
            valid[i, p_len - len(p): p_len] = True
        positions = np.maximum(np.cumsum(valid[:, :p_len], axis=1) - 1, 0).astype(np.int32)
        params = self.model.prepare(params)  # e.g. a prompt's keys/values, once instead of every token
        tok, cache = self._step(params, ids, valid, positions, init_cache(self.model.cfg, b, valid.shape[1]),
                                jnp.int32(0))
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
            tok, cache = self._step(params, t[:, None], valid, (positions[:, -1] + n)[:, None].astype(np.int32),
                                    cache, jnp.int32(p_len + n - 1))
        return [_until_eos(out[i, :n], eos_id) for i in range(b)]


def _until_eos(row: np.ndarray, eos_id: int | None) -> np.ndarray:
    if eos_id is not None and (row == eos_id).any():
        return row[: int(np.argmax(row == eos_id)) + 1]
    return row


def generator(model) -> Generator:
    """The model's Generator, made on first use and kept as long as the model lives."""
    if model not in _GENERATORS:
        _GENERATORS[model] = Generator(model)
    return _GENERATORS[model]


def greedy(model, params, prompts: list[np.ndarray], max_new_tokens: int, eos_id: int | None,
           pad_id: int = 0) -> list[np.ndarray]:
    """`generator(model).greedy(...)`."""
    return generator(model).greedy(params, prompts, max_new_tokens, eos_id, pad_id)


def chat(model, params, tokenizer, conversations: list, max_new_tokens: int) -> list[str]:
    """Replies to conversations (a user prompt string or a list of messages), without specials."""
    from sftjax.data.chat import prompt_ids

    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": c}] if isinstance(c, str) else c)
               for c in conversations]
    outs = greedy(model, params, prompts, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
