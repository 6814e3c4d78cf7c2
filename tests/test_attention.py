"""Block-causal attention (models/layers.causal_attention) equals full grouped attention, and the
hand-written backward of grouped attention equals autodiff of a plain softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftjax.models import llama
from sftjax.models.layers import (
    ATTENTION_LSE,
    NEG_INF,
    attention_mask,
    causal_attention,
    causal_blocks,
    grouped_attention,
)


def attention_case(t=48, prefix=3, nh=6, padding=np.s_[:5], seed=1):
    """q, k, v (2 KV heads of 8), the mask and loss weights for two rows: row 0 packs two examples,
    row 1 is padded at `padding` (left padding: with no prefix those queries see no key at all);
    `prefix` memory keys every query sees."""
    b, nkv, hd = 2, 2, 8
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, nh, hd))
    k = jax.random.normal(ks[1], (b, prefix + t, nkv, hd))
    v = jax.random.normal(ks[2], (b, prefix + t, nkv, hd))
    valid = np.ones((b, t), bool)
    valid[1, padding] = False
    segments = np.ones((b, t), np.int32)
    segments[0, t // 3:] = 2
    mask = attention_mask(jnp.asarray(valid), jnp.asarray(segments))
    mask = jnp.concatenate([jnp.ones((b, t, prefix), bool), mask], axis=-1)
    return q, k, v, mask, jax.random.normal(ks[3], (b, t, nh * hd))


@pytest.mark.parametrize("t,prefix", [(256, 0), (512, 0), (512, 3), (1024, 5)])
def test_causal_blocks_equal_full_attention(t, prefix):
    q, k, v, mask, _ = attention_case(t, prefix, nh=4, padding=np.s_[t - 40:], seed=0)  # right padding
    assert causal_blocks(t) == {256: 2, 512: 4, 1024: 8}[t]
    full = grouped_attention(q, k, v, mask, jnp.float32)
    blocked = jax.jit(causal_attention, static_argnums=4)(q, k, v, mask, jnp.float32)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=2e-6)


def plain_attention(q, k, v, mask, dtype):
    """Softmax attention as the textbook writes it, K/V heads repeated; jax differentiates it."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2).astype(dtype), jnp.repeat(v, g, axis=2).astype(dtype)
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(dtype), k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None], scores / np.sqrt(q.shape[-1]), NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bhts,bshd->bthd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(*q.shape[:2], -1).astype(dtype)


@pytest.mark.parametrize("prefix", [0, 3])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_attention_backward_equals_autodiff_of_plain_softmax(prefix, dtype, tol):
    """Also for queries that see no key (left padding without a prefix): forward and gradients
    match the plain softmax there too, so nothing non-finite leaks from padding rows."""
    q, k, v, mask, w = attention_case(prefix=prefix)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask, dtype).astype(jnp.float32) * w)

    want = jax.grad(loss(plain_attention), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss(grouped_attention), argnums=(0, 1, 2)))(q, k, v)
    for name, g, r in zip("qkv", got, want, strict=True):
        assert np.all(np.isfinite(np.asarray(g))), name
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=tol * scale, err_msg=name)
    np.testing.assert_allclose(np.asarray(grouped_attention(q, k, v, mask, dtype), np.float32),
                               np.asarray(plain_attention(q, k, v, mask, dtype), np.float32), atol=tol * 4)


def test_remat_keeps_the_log_normaliser_and_never_reruns_attention_forward(capsys):
    """Under the default remat policy the backward takes attention's log-normaliser from the
    forward (a saved residual): 2 products forward (scores, P V) and 5 backward (scores, dP, dV,
    dQ, dK). Under `full` the forward's scores are computed a third time to get it back."""
    from jax.ad_checkpoint import print_saved_residuals

    q, k, v, mask, w = attention_case(prefix=0)
    products = {}
    for name in ("dots_with_no_batch_dims_saveable", "full"):
        _, policy = llama.remat_policy(name)

        def loss(q, k, v, policy=policy):
            attend = jax.checkpoint(lambda q, k, v: grouped_attention(q, k, v, mask, jnp.float32), policy=policy)
            return jnp.sum(attend(q, k, v) * w)

        capsys.readouterr()
        print_saved_residuals(loss, q, k, v)
        saved = capsys.readouterr().out
        assert (f"named '{ATTENTION_LSE}'" in saved) == (name != "full"), saved
        products[name] = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)).count("dot_general[")
    assert products == {"dots_with_no_batch_dims_saveable": 7, "full": 8}
