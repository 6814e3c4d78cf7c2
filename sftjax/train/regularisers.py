"""FGM adversarial training on the input embeddings (Miyato et al. 2017, "fast gradient method").

Each micro-batch runs twice: a clean forward/backward that also yields g, the gradient of the
loss with respect to the token embeddings, then a forward/backward with r = epsilon * g / ||g||
added to them; the two parameter gradients are summed, as in the usual PyTorch recipe
(`loss.backward(); attack(); loss_adv.backward()`). The perturbation enters the model as an
`embed_delta` leaf of the param tree, so the loss code is unchanged; the gradient with respect to
a zero `embed_delta` is exactly the gradient with respect to the embeddings. Reported loss: the clean one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fgm(value_and_grad, epsilon: float, hidden_size: int):
    """Wrap `value_and_grad(trainable, frozen, batch, rng) -> ((loss_sum, aux), grads)`."""

    def wrapped(trainable, frozen, mb, rng):
        zero = jnp.zeros((*mb["input_ids"].shape, hidden_size), jnp.float32)
        (loss_sum, aux), g = value_and_grad({**trainable, "embed_delta": zero}, frozen, mb, rng)
        g = dict(g)
        g_emb = g.pop("embed_delta")
        r = epsilon * g_emb / jnp.maximum(jnp.sqrt(jnp.sum(g_emb * g_emb)), 1e-12)
        _, g_adv = value_and_grad({**trainable, "embed_delta": jax.lax.stop_gradient(r)}, frozen, mb, rng)
        g_adv = dict(g_adv)
        g_adv.pop("embed_delta")
        return (loss_sum, aux), jax.tree.map(jnp.add, g, g_adv)

    return wrapped
