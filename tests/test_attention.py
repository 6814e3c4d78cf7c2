"""Block-causal attention (models/layers.causal_attention) equals full grouped attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftjax.models.layers import attention_mask, causal_attention, causal_blocks, grouped_attention


@pytest.mark.parametrize("t,prefix", [(256, 0), (512, 0), (512, 3), (1024, 5)])
def test_causal_blocks_equal_full_attention(t, prefix):
    b, nh, nkv, hd = 2, 4, 2, 8
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, t, nh, hd))
    k = jax.random.normal(ks[1], (b, prefix + t, nkv, hd))
    v = jax.random.normal(ks[2], (b, prefix + t, nkv, hd))
    valid = np.ones((b, t), bool)
    valid[1, t - 40:] = False  # right padding
    segments = np.ones((b, t), np.int32)
    segments[0, t // 3:] = 2  # two packed examples in row 0
    mask = attention_mask(jnp.asarray(valid), jnp.asarray(segments))
    mask = jnp.concatenate([jnp.ones((b, t, prefix), bool), mask], axis=-1)  # memory keys every query sees
    assert causal_blocks(t) == {256: 2, 512: 4, 1024: 8}[t]
    full = grouped_attention(q, k, v, mask, jnp.float32)
    blocked = jax.jit(causal_attention, static_argnums=4)(q, k, v, mask, jnp.float32)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=2e-6)
