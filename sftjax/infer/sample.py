"""Sampling settings and the choice of the next token: greedy, temperature, top-k, top-p.

`pick` runs inside the jitted decoding step, and its settings arrive there as traced scalars, so
one compiled step serves every temperature, top-k, top-p and seed: changing them between calls
compiles nothing. Temperature 0 is greedy (argmax; a `lax.cond` skips the sort). Otherwise the
logits are divided by the temperature, cut to the `top_k` largest (0: all), then to the smallest
set whose probability reaches `top_p` (the nucleus; 1: all), and one token is drawn. Ties at the
cut-off value are all kept. The key is the seed folded with the step index, so the same seed,
prompts and batch give the same tokens. Stop strings act on decoded text, on the host, in
`generate.chat`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sftjax.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """How to choose each generated token.

    Attributes:
        temperature: 0 picks the most likely token (greedy); above 0, divides the logits.
        top_k: sample among the k most likely tokens only; 0 means no limit.
        top_p: sample among the most likely tokens whose probabilities sum to at least top_p; 1 means all.
        seed: random seed; the same seed and prompts give the same tokens.
        stop: strings that end a reply; the reply is cut before the first one found.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UserError(f"temperature: {self.temperature} is negative; use 0 for greedy or a value above 0")
        if self.top_k < 0:
            raise UserError(f"top_k: {self.top_k} is negative; use 0 for no limit")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p: {self.top_p} is outside (0, 1]; use 1 for no limit")
        if any(not s for s in self.stop):
            raise UserError("stop: an empty stop string would end every reply at once")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def arrays(self) -> tuple[jax.Array, ...]:
        """(temperature, top_k, top_p, seed) as scalars for the jitted step (traced, never static)."""
        return (jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p),
                jnp.uint32(self.seed))


def pick(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, seed: jax.Array,
         step: jax.Array) -> jax.Array:
    """Next token int32 [B] from last-position logits [B, V]; all other arguments are scalars."""
    logits = logits.astype(jnp.float32)

    def draw(logits):
        scaled = logits / temperature
        desc = -jnp.sort(-scaled, axis=-1)  # [B, V], largest first
        vocab = scaled.shape[-1]
        rank = jnp.arange(vocab)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        probs = jax.nn.softmax(jnp.where(rank < k, desc, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
        kept = jnp.maximum(jnp.sum((rank < k) & ((before < top_p) | (top_p >= 1)), axis=-1), 1)  # [B]
        cutoff = jnp.take_along_axis(desc, (kept - 1)[:, None], axis=-1)  # smallest kept value
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.categorical(key, jnp.where(scaled >= cutoff, scaled, -jnp.inf), axis=-1).astype(jnp.int32)

    def argmax(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, argmax, logits)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    at = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)
