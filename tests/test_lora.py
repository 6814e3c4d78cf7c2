import jax
import numpy as np

from sftjax import lora
from sftjax.params import flatten


def _apply(model, params, ids):
    return np.asarray(model.apply({"params": params}, ids))


def test_step0_identity_and_merge(tiny_config):
    from sftjax.setup import build

    setup = build(tiny_config)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 12)).astype(np.int32)
    base = _apply(setup.model, setup.frozen, ids)
    with_adapters = _apply(setup.model, setup.full_params(), ids)
    np.testing.assert_array_equal(base, with_adapters)  # B = 0: bit-identical at step 0

    # With non-zero B, the in-graph adapters equal the merged kernels.
    trained = jax.tree.map(lambda x: x + 0.05, setup.trainable)
    adapted = _apply(setup.model, setup.full_params(trained), ids)
    merged = _apply(setup.model, setup.merged_params(trained), ids)
    assert np.abs(adapted - base).max() > 1e-3
    np.testing.assert_allclose(adapted, merged, atol=2e-5)


def test_targets_presets_and_shapes(tiny_config):
    from sftjax.setup import build

    setup = build(tiny_config)
    base = setup.frozen
    qv = lora.init_adapters(base, ["qv"], 4, 0)
    assert sorted(flatten(qv)) == ["layers/self_attn/q_proj/lora_a", "layers/self_attn/q_proj/lora_b",
                                   "layers/self_attn/v_proj/lora_a", "layers/self_attn/v_proj/lora_b"]
    allin = lora.init_adapters(base, ["all_linear"], 4, 0)
    assert len(flatten(allin)) == 14
    a = flatten(qv)["layers/self_attn/q_proj/lora_a"]
    assert a.shape == (2, 64, 4) and flatten(qv)["layers/self_attn/q_proj/lora_b"].shape == (2, 4, 64)
    assert not flatten(qv)["layers/self_attn/q_proj/lora_b"].any()


def test_unmatched_target_raises():
    import pytest

    from sftjax.errors import UserError

    base = {"layers": {"self_attn": {"q_proj": {"kernel": np.zeros((2, 4, 4))}}}}
    with pytest.raises(UserError, match="lora.targets: pattern 'qproj' matches no parameter"):
        lora.init_adapters(base, ["qproj"], 2, 0)
