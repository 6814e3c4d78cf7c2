import jax
import numpy as np
import pytest

from sftjax.params import flatten
from sftjax.peft import lora


def _apply(model, params, ids):
    return np.asarray(model.apply(params, ids))


def test_step0_identity_and_merge(tiny_config):
    from sftjax.build import build

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
    from sftjax.build import build

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


@pytest.mark.parametrize("scan", [True, False])
def test_rank_overrides_merge_unmerge_round_trip(tiny_config, scan):
    from sftjax.build import build

    cfg = tiny_config
    cfg.model.scan_layers = scan
    cfg.lora.targets = ("all_linear",)
    cfg.lora.rank_overrides = ((r"mlp/", 4), (r"v_proj$", 2))
    setup = build(cfg)
    flat = flatten(setup.trainable)
    pre = "layers" if scan else "layers_1"
    assert flat[f"{pre}/mlp/up_proj/lora_a"].shape[-1] == 4
    assert flat[f"{pre}/self_attn/v_proj/lora_b"].shape[-2] == 2
    assert flat[f"{pre}/self_attn/q_proj/lora_a"].shape[-1] == 8
    trained = jax.tree.map(lambda x: x + 0.05, setup.trainable)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 12)).astype(np.int32)
    adapted = _apply(setup.model, setup.full_params(trained), ids)
    params = setup.full_params(trained)
    merged = lora.merge(params, cfg.lora.alpha)
    # Each module scales by alpha over its own rank, in the graph and in the merge alike.
    np.testing.assert_allclose(_apply(setup.model, merged, ids), adapted, atol=2e-5)
    base = {k: v for k, v in flatten(params).items() if not k.endswith(lora.ADAPTER_LEAVES)}
    back = flatten(lora.unmerge(merged, trained, cfg.lora.alpha))
    assert sorted(back) == sorted(base)
    for k, v in base.items():
        np.testing.assert_allclose(np.asarray(back[k]), np.asarray(v), atol=1e-6, err_msg=k)


def test_rank_override_that_matches_nothing_raises(tiny_config):
    from sftjax.build import build
    from sftjax.errors import UserError

    tiny_config.lora.rank_overrides = ((r"mlp/", 4),)  # targets are q and v only
    with pytest.raises(UserError, match="lora.rank_overrides: pattern 'mlp/' matches no parameter"):
        build(tiny_config)
    tiny_config.lora.rank_overrides = ((r"q_proj", 0),)
    from sftjax.config import validate

    with pytest.raises(UserError, match="lora.rank_overrides: each entry"):
        validate(tiny_config)


def test_dora_step0_identity_merge_and_gradients(tiny_config):
    from sftjax.build import build

    cfg = tiny_config
    cfg.lora.dora = True
    cfg.lora.targets = ("attention",)
    setup = build(cfg)
    flat = flatten(setup.trainable)
    assert flat["layers/self_attn/o_proj/lora_magnitude"].shape == (2, 64)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 12)).astype(np.int32)
    base = _apply(setup.model, setup.frozen, ids)
    step0 = _apply(setup.model, setup.full_params(), ids)
    err0 = np.abs(step0 - base).max()
    print(f"DoRA step-0 max |logit diff| vs base: {err0:.3g}")
    assert err0 <= 1e-6, err0

    # Trained adapters: the in-graph DoRA equals the merged m * V / ||V||_c kernels.
    rng = np.random.default_rng(1)
    trained = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), setup.trainable)
    adapted = _apply(setup.model, setup.full_params(trained), ids)
    merged = _apply(setup.model, setup.merged_params(trained), ids)
    assert np.abs(adapted - base).max() > 1e-3
    np.testing.assert_allclose(adapted, merged, atol=5e-5)
    with pytest.raises(Exception, match="cannot be unmerged"):
        lora.unmerge(setup.merged_params(trained), trained, cfg.lora.alpha)

    # The magnitude receives a gradient; the column norm is a constant (stop_gradient), as in PEFT.
    def loss(tr):
        return setup.model.apply(setup.full_params(tr), ids).sum()

    g = flatten(jax.grad(loss)(trained))
    assert np.abs(np.asarray(g["layers/self_attn/q_proj/lora_magnitude"])).max() > 0


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_adapter_delta_gradients_equal_autodiff(dtype, tol):
    """The written-out backward of s * (h @ A) @ B gives autodiff's gradients for h, A and B."""
    from sftjax.models.layers import dot

    rng = np.random.default_rng(0)
    h = jax.numpy.asarray(rng.normal(size=(3, 5, 16)), dtype)
    a, b = (jax.numpy.asarray(rng.normal(size=s), "float32") for s in ((16, 4), (4, 24)))
    w = jax.numpy.asarray(rng.normal(size=(3, 5, 24)), "float32")

    def loss(fn):
        return lambda h, a, b: (fn(h, a, b).astype("float32") * w).sum()

    plain = loss(lambda h, a, b: dot(dot(h, a, dtype), b, dtype) * 2.0)
    written = loss(lambda h, a, b: lora.adapter_delta(h, a, b, 2.0, dtype))
    assert float(plain(h, a, b)) == pytest.approx(float(written(h, a, b)), rel=1e-6)
    got, want = jax.grad(written, (0, 1, 2))(h, a, b), jax.grad(plain, (0, 1, 2))(h, a, b)
    for g, e in zip(got, want, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        scale = float(np.abs(np.asarray(e, np.float32)).max())
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), atol=tol * scale)


def _remat_grads(cfg, remat: str, ids):
    """Adapter gradients of the mean squared logits with `model.remat=remat` (trained, non-zero B)."""
    from sftjax.build import build

    cfg.model.remat = remat
    setup = build(cfg)
    rng = np.random.default_rng(1)
    trained = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), setup.trainable)

    def loss(tr):
        return (setup.model.apply(setup.full_params(tr), ids) ** 2).mean()

    return setup, trained, loss, flatten(jax.grad(loss)(trained))


@pytest.mark.parametrize("dora", [False, True])
def test_remat_policies_keep_adapter_gradients_and_save_the_sum(tiny_config, dora, capsys):
    """Every remat policy gives the gradients of no remat; the matmul-saving policies keep each
    LoRA layer's output W x + s B A x (named ADAPTED), not its two matmul outputs."""
    cfg = tiny_config
    cfg.lora.targets = ("all_linear",)
    cfg.lora.dora = dora
    ids = np.random.default_rng(0).integers(0, 1000, (2, 16)).astype(np.int32)
    *_, ref = _remat_grads(cfg, "none", ids)
    for remat in ("full", "dots_saveable", "dots_with_no_batch_dims_saveable"):
        setup, trained, loss, got = _remat_grads(cfg, remat, ids)
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-7, err_msg=f"{remat} {k}")
    from jax.ad_checkpoint import print_saved_residuals

    # The residuals of the last policy above, the default (dots_with_no_batch_dims_saveable).
    assert setup.model.base.rt.remat == "dots_with_no_batch_dims_saveable"
    capsys.readouterr()
    print_saved_residuals(loss, trained)
    saved = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if "output of scan" in ln]
    # Per layer, gate and up are kept as their sums (2 residuals [.., tokens, intermediate]), not
    # as W x and s B A x each (4). DoRA's magnitude gradient needs both products: it keeps 4.
    wide = [s for s in saved if s.endswith(f",{ids.size},{setup.model_cfg.intermediate_size}]")
            or s.endswith(f",{ids.shape[1]},{setup.model_cfg.intermediate_size}]")]
    assert len(wide) == (4 if dora else 2), saved
