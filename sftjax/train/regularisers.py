"""Regularisers on the input embeddings: NEFTune noise and FGM adversarial training.

Both are transforms on the `Embed` hook point (see `sftjax/peft/adapted.py`), so the model and the
loss code know nothing of them.

- NEFTune (Jain et al. 2023): U(-1, 1) * alpha / sqrt(L * d) noise on [B, L, d] embeddings, with L
  the (padded) row length as in the reference and HF implementations; training only (when the
  model runs with a "dropout" rng).
- FGM (Miyato et al. 2017, "fast gradient method"): each micro-batch runs twice, a clean
  forward/backward that also yields g, the gradient of the loss with respect to the token
  embeddings, then one with r = epsilon * g / ||g|| added to them; the two parameter gradients are
  summed, as in the usual PyTorch recipe (`loss.backward(); attack(); loss_adv.backward()`). The
  perturbation enters as an `embed_tokens/fgm_delta` leaf of the param tree; the gradient with
  respect to a zero delta is exactly the gradient with respect to the embeddings. Reported loss:
  the clean one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sftjax.models.layers import Embed
from sftjax.params import flatten, merge, unflatten
from sftjax.peft.adapted import Transform, hook

DELTA = "embed_tokens/fgm_delta"


def neftune_noise(rng: jax.Array, shape: tuple[int, ...], alpha: float) -> jax.Array:
    """U(-1, 1) * alpha / sqrt(L * d) for [B, L, d] embeddings."""
    return jax.random.uniform(rng, shape, jnp.float32, -1.0, 1.0) * (alpha / math.sqrt(shape[-2] * shape[-1]))


@dataclass(frozen=True)
class NEFTune(Transform):
    alpha: float

    def intercept(self, next_fun, args, kwargs, context):
        x = next_fun(*args, **kwargs)
        if hook(context, Embed) and context.module.has_rng("dropout"):
            x = x + neftune_noise(context.module.make_rng("dropout"), x.shape, self.alpha).astype(x.dtype)
        return x


class EmbedDelta(Transform):
    """Adds the `fgm_delta` leaf (if present) to the input embeddings."""

    def intercept(self, next_fun, args, kwargs, context):
        x = next_fun(*args, **kwargs)
        if hook(context, Embed) and context.module.has_variable("params", "fgm_delta"):
            x = x + context.module.get_variable("params", "fgm_delta").astype(x.dtype)
        return x


def fgm(value_and_grad, epsilon: float, hidden_size: int):
    """Wrap `value_and_grad(trainable, frozen, batch, rng) -> ((loss_sum, aux), grads)` (the model
    must run with the `EmbedDelta` transform)."""

    def with_delta(trainable, frozen, mb, rng, delta):
        out, g = value_and_grad(merge(trainable, unflatten({DELTA: delta})), frozen, mb, rng)
        g = flatten(g)
        g_emb = g.pop(DELTA)
        return out, unflatten(g), g_emb

    def wrapped(trainable, frozen, mb, rng):
        zero = jnp.zeros((*mb["input_ids"].shape, hidden_size), jnp.float32)
        (loss_sum, aux), g, g_emb = with_delta(trainable, frozen, mb, rng, zero)
        r = epsilon * g_emb / jnp.maximum(jnp.sqrt(jnp.sum(g_emb * g_emb)), 1e-12)
        _, g_adv, _ = with_delta(trainable, frozen, mb, rng, jax.lax.stop_gradient(r))
        return (loss_sum, aux), jax.tree.map(jnp.add, g, g_adv)

    return wrapped
