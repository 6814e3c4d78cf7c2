"""Decoding with a key/value cache, compiled once per model and shape: greedy or sampled.

Prompts are left-padded to a common length (a multiple of 8) so every row writes its next token
into the same cache slot; padding slots are masked out and positions count real tokens only, so a
padded row decodes exactly as it would alone. Without a `done` callback the prompt (prefill) and
every later token run in one compiled `while_loop` that ends when every row has produced EOS, so
no token waits on the host; with one (stop strings), the host drives two compiled shapes per
(batch, prompt length, max_new_tokens), the prompt and one token, the cache donated between them.
The jitted functions belong to a `Generator` kept per model, so repeated calls (samples at every
evaluation, `sftjax generate`) compile nothing.
On the CPU backend a model with stacked (scanned) layers decodes through an unrolled copy of
itself: XLA:CPU copies each layer's weights out of the stacked array before every matrix-vector
product, which at batch 1 made a token cost about 2.6x the weight reads (SmolLM2-135M: a scan over
30 576x1536 weights took 7.0 ms, separate arrays 2.7 ms). The layers are unstacked once per call
(`models/layout.unstack`), so the weights are held twice while it runs: that is done only while
the layer weights take at most `UNROLL_MAX_BYTES` (SmolLM2-135M in float32: 0.4 GiB), and the
unrolled loop compiles slower (the first call at batch 1: 13.5-14.0 s against 4.3 s). Unrolled
layers also keep their key/value cache as one buffer per layer: a cache stacked over layers was
sliced and stacked again for every token (SmolLM2-135M at batch 8: 121-122 -> 151-154 tokens/s).

The sampling settings (temperature, top-k, top-p, seed; see sample.py) enter the step as traced
scalars, so changing them compiles nothing either. A row stops at EOS or when `done` says so
(`chat` uses it for stop strings); the batch stops when every row has.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.infer.sample import Sampling, cut_at_stop, pick
from sftjax.models import layout
from sftjax.models.llama import init_cache
from sftjax.peft import quant
from sftjax.peft.adapted import Adapted, Transform

_GENERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
UNROLL_MAX_BYTES = 2 * 2**30  # layer weights held twice while decoding through the unrolled copy


class Generator:
    """Decoding for one model (an `Adapted`); get it with `generator(model)`."""

    def __init__(self, model):
        self._model = weakref.ref(model)  # the registry is keyed by the model: no strong cycle back to it
        self.traces = 0  # how many times the decoding step was traced (compiled), for tests and logs
        self._step = jax.jit(self._decode, donate_argnums=4)  # the cache is updated in place
        self._loop = jax.jit(self._decode_all)
        self._unrolled = unrolled(model)
        self._use_unrolled = None  # decided on the first call, from the size of the layer weights
        layers = model.cfg.num_hidden_layers  # not `model` itself: the registry must not keep it alive
        self._unstack = jax.jit(lambda p: layout.unstack(p, layers))

    @property
    def model(self):
        """The model that decodes: the unrolled copy where it is used (see the module docstring)."""
        return self._unrolled if self._use_unrolled else self._model()

    def _decode(self, params, ids, valid, positions, cache, index, settings, step):
        self.traces += 1
        last = jnp.full((ids.shape[0], 1), ids.shape[1] - 1, jnp.int32)
        logits, cache = self.model.apply(params, ids, valid, positions, cache=cache, cache_index=index,
                                         head_positions=last)
        return pick(logits[:, -1], *settings, step), cache

    def _decode_all(self, params, ids, valid, positions, cache, settings, eos):
        """The prompt, then one token at a time until every row has produced `eos` or the
        buffer is full, in one compiled loop: no host round trip per token. ([B, N] tokens, the
        number of steps taken); a row's tokens after its first `eos` are to be dropped."""
        b, p_len = ids.shape
        tok, cache = self._decode(params, ids, valid, positions, cache, jnp.int32(0), settings, jnp.int32(0))
        out = jnp.zeros((b, valid.shape[1] - p_len), jnp.int32).at[:, 0].set(tok)

        def more(carry):
            n, _, out, done, _, _ = carry
            return (n < out.shape[1]) & ~done.all()

        def step(carry):
            n, tok, out, done, valid, cache = carry
            valid = jax.lax.dynamic_update_slice(valid, jnp.ones((b, 1), bool), (0, p_len + n - 1))
            tok, cache = self._decode(params, tok[:, None], valid, positions[:, -1:] + n, cache, p_len + n - 1,
                                      settings, n)
            return n + 1, tok, out.at[:, n].set(tok), done | (tok == eos), valid, cache

        n, _, out, _, _, _ = jax.lax.while_loop(more, step, (jnp.int32(1), tok, out, tok == eos, valid, cache))
        return out, n

    def generate(self, params, prompts: list[np.ndarray], max_new_tokens: int, eos_id: int | None,
                 pad_id: int = 0, sampling: Sampling | None = None,
                 done: Callable[[int, np.ndarray], bool] | None = None) -> list[np.ndarray]:
        """Generated token ids (without the prompt, up to and including EOS) for each prompt.

        Args:
            sampling: how to pick tokens (default: greedy); its `stop` strings are not read here.
            done: `done(row, ids_so_far)` -> True ends that row after its latest token (stop strings).
        """
        b = len(prompts)
        settings = (sampling or Sampling()).arrays()
        p_len = -(-max(len(p) for p in prompts) // 8) * 8
        ids = np.full((b, p_len), pad_id, np.int32)
        valid = np.zeros((b, p_len + max_new_tokens), bool)
        for i, p in enumerate(prompts):
            ids[i, p_len - len(p):] = p
            valid[i, p_len - len(p): p_len] = True
        positions = np.maximum(np.cumsum(valid[:, :p_len], axis=1) - 1, 0).astype(np.int32)
        if self._use_unrolled is None:
            self._use_unrolled = self._unrolled is not None and quant.nbytes(params.get("layers", {})) <= UNROLL_MAX_BYTES
        params = self.model.prepare(params)  # e.g. a prompt's keys/values, once instead of every token
        if self._use_unrolled:
            params = self._unstack(params)
        # Unrolled layers keep one cache buffer per layer (stacked, every token copied the cache).
        cache = init_cache(self.model.cfg, b, valid.shape[1], per_layer=not self.model.base.rt.scan_layers)
        if done is None:  # nothing to ask the host between tokens: the whole loop runs compiled
            toks, n = self._loop(params, ids, valid, positions, cache, settings, jnp.int32(-1 if eos_id is None else eos_id))
            toks = np.asarray(toks)[:, : int(n)]
            ends = [np.flatnonzero(row == eos_id) if eos_id is not None else () for row in toks]
            return [row[: e[0] + 1] if len(e) else row for row, e in zip(toks, ends, strict=True)]
        tok, cache = self._step(params, ids, valid, positions, cache, jnp.int32(0), settings, jnp.int32(0))
        out = np.zeros((b, max_new_tokens), np.int32)
        length = np.full(b, max_new_tokens)  # a row's tokens end here (EOS included)
        for n in range(1, max_new_tokens + 1):
            t = np.asarray(tok)
            out[:, n - 1] = t
            for i in np.flatnonzero(length == max_new_tokens):
                if (eos_id is not None and t[i] == eos_id) or (done is not None and done(i, out[i, :n])):
                    length[i] = n
            if n == max_new_tokens or (length < max_new_tokens).all():
                break
            valid[:, p_len + n - 1] = True
            tok, cache = self._step(params, t[:, None], valid, (positions[:, -1] + n)[:, None].astype(np.int32),
                                    cache, jnp.int32(p_len + n - 1), settings, jnp.int32(n))
        return [out[i, : length[i]] for i in range(b)]

    def greedy(self, params, prompts: list[np.ndarray], max_new_tokens: int, eos_id: int | None,
               pad_id: int = 0) -> list[np.ndarray]:
        """`generate` with the default (greedy) settings."""
        return self.generate(params, prompts, max_new_tokens, eos_id, pad_id)


def unrolled(model) -> Adapted | None:
    """`model` with its layers unrolled, where decoding should use that (CPU backend, stacked
    layers, no transform that rewrites the param tree before the model runs), else None."""
    rt = getattr(model.base, "rt", None)
    if jax.default_backend() != "cpu" or rt is None or not rt.scan_layers:
        return None
    if any(type(t).prepare is not Transform.prepare for t in model.transforms):
        return None
    return Adapted(model.base.clone(rt=dataclasses.replace(rt, scan_layers=False)), model.transforms)


def generator(model) -> Generator:
    """The model's Generator, made on first use and kept as long as the model lives."""
    if model not in _GENERATORS:
        _GENERATORS[model] = Generator(model)
    return _GENERATORS[model]


def greedy(model, params, prompts: list[np.ndarray], max_new_tokens: int, eos_id: int | None,
           pad_id: int = 0) -> list[np.ndarray]:
    """`generator(model).greedy(...)`."""
    return generator(model).greedy(params, prompts, max_new_tokens, eos_id, pad_id)


def sample(model, params, prompts: list[np.ndarray], max_new_tokens: int, eos_id: int | None,
           sampling: Sampling, pad_id: int = 0) -> list[np.ndarray]:
    """`generator(model).generate(...)` with `sampling` (its stop strings are for `chat`, on text)."""
    return generator(model).generate(params, prompts, max_new_tokens, eos_id, pad_id, sampling)


def chat(model, params, tokenizer, conversations: list, max_new_tokens: int,
         sampling: Sampling | None = None) -> list[str]:
    """Replies to conversations (a user prompt string or a list of messages), without specials,
    each cut before the first of `sampling.stop` (a row stops generating once one appears)."""
    from sftjax.data.chat import prompt_ids

    sampling = sampling or Sampling()
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": c}] if isinstance(c, str) else c)
               for c in conversations]

    def text(ids: np.ndarray) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def stopped(_row: int, ids: np.ndarray) -> bool:
        return cut_at_stop(text(ids), sampling.stop)[1]

    outs = generator(model).generate(params, prompts, max_new_tokens, tokenizer.eos_token_id,
                                     tokenizer.pad_token_id or 0, sampling, stopped if sampling.stop else None)
    return [cut_at_stop(text(o), sampling.stop)[0].strip() for o in outs]
