"""QLoRA: blockwise NF4 / int8 kernels, dequantised in the matmul; only adapters train."""

import jax
import numpy as np
import pytest
from helpers import first_batch

from sftjax.params import flatten
from sftjax.peft import quant


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dequantisation_error_bound(kind):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((3, 128, 96)) * rng.uniform(0.01, 1, (3, 1, 96))).astype(np.float32)
    q = quant.quantize(w, kind)
    assert q["kernel_absmax"].shape == (3, 128 * 96 // 64)
    assert q[f"kernel_{kind}"].shape == ((3, 128, 48) if kind == "nf4" else (3, 128, 96))
    back = np.asarray(quant.dequantize(q[f"kernel_{kind}"], q["kernel_absmax"], kind))
    err = np.abs(back - w).reshape(3, -1, 64)
    absmax = np.abs(w).reshape(3, -1, 64).max(-1, keepdims=True)
    # Rounding to the nearest code: at most half the widest gap between neighbouring codes.
    half_gap = (np.diff(quant.NF4).max() / 2) if kind == "nf4" else 0.5 / 127
    assert (err <= half_gap * absmax * (1 + 1e-5) + 1e-7).all()
    # Each block's absmax itself is exact (the +-1 codes), and a zero block stays zero.
    np.testing.assert_allclose(np.abs(back).reshape(3, -1, 64).max(-1, keepdims=True), absmax, rtol=1e-6)
    rel = float(np.sqrt((err ** 2).mean() / (w ** 2).mean()))
    assert rel < (0.12 if kind == "nf4" else 0.01), rel
    zero = quant.quantize(np.zeros((64, 2), np.float32), kind)
    assert not np.asarray(quant.dequantize(zero[f"kernel_{kind}"], zero["kernel_absmax"], kind)).any()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_step_trains_only_adapters(tiny_config, kind):
    from helpers import init_state

    from sftjax.build import build
    from sftjax.train.step import make_train_step

    cfg = tiny_config
    cfg.model.quantize = kind
    cfg.lora.targets = ("all_linear",)
    cfg.lora.dora = kind == "nf4"  # DoRA over a quantised base too
    setup = build(cfg)
    frozen = flatten(setup.frozen)
    assert f"layers/mlp/up_proj/kernel_{kind}" in frozen and "layers/mlp/up_proj/kernel" not in frozen
    assert frozen["lm_head/kernel"].dtype == np.float32  # embeddings and head are not quantised

    # Step 0: the adapted model equals the (dequantised) base; the in-graph dequantisation equals
    # the reference one; and the quantised model stays close to the float one.
    ids = np.random.default_rng(0).integers(0, 1000, (2, 12)).astype(np.int32)
    q_logits = np.asarray(setup.model.apply(setup.frozen, ids))
    deq = quant.dequantize_tree(setup.frozen)
    np.testing.assert_allclose(np.asarray(setup.model.apply(deq, ids)), q_logits, atol=1e-5)
    np.testing.assert_allclose(np.asarray(setup.model.apply(setup.full_params(), ids)), q_logits,
                               atol=1e-5)

    before_frozen = {k: np.array(v) for k, v in frozen.items()}
    before_train = {k: np.array(v) for k, v in flatten(setup.trainable).items()}
    state, tx, sched = init_state(setup, cfg)
    batch = first_batch(setup, cfg)
    step = make_train_step(setup.model, tx, sched, 1, False, 0)
    losses = []
    for _ in range(3):
        state, m = step(state, setup.frozen, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    for k, v in flatten(setup.frozen).items():
        assert np.array_equal(np.asarray(v), before_frozen[k]), k
    after = flatten(state.trainable)
    assert all(not np.array_equal(np.asarray(after[k]), before_train[k]) for k in before_train if "lora_b" in k)
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0) == 2 * sum(
        x.size for x in jax.tree.leaves(state.trainable))
    # Merging for export dequantises: plain float kernels, no code leaves.
    merged = flatten(setup.merged_params(state.trainable))
    assert merged["layers/mlp/up_proj/kernel"].dtype == np.float32 and not any("kernel_" in k for k in merged)


def test_quantize_without_a_frozen_base_names_the_key(tiny_config):
    from sftjax.build import build
    from sftjax.errors import UserError

    tiny_config.lora.enabled = False
    tiny_config.model.quantize = "nf4"
    with pytest.raises(UserError, match="model.quantize=nf4: no frozen decoder-layer kernel"):
        build(tiny_config)


def test_backward_keeps_no_dequantised_kernels(tiny_config):
    """The compiled gradient's scratch memory does not grow by the full-precision kernels: they
    are dequantised again in the backward pass, not stored from the forward pass."""
    import jax.numpy as jnp

    from sftjax.build import build
    from sftjax.train.step import token_stats

    def temp_bytes(kind):
        tiny_config.model.quantize = kind
        tiny_config.lora.targets = ("all_linear",)
        s = build(tiny_config)
        b, t = 4, 32
        batch = {"input_ids": jnp.zeros((b, t), jnp.int32), "valid": jnp.ones((b, t), bool),
                 "labels": jnp.zeros((b, t), jnp.int32), "weights": jnp.ones((b, t), jnp.float32)}
        g = jax.jit(jax.grad(lambda tr, fr, bt: token_stats(s.model, tr, fr, bt)["loss_sum"]))
        kernels = sum(v.size * 4 for k, v in flatten(s.merged_params()).items() if quant.LAYER_KERNEL.search(k))
        return g.lower(s.trainable, s.frozen, batch).compile().memory_analysis().temp_size_in_bytes, kernels

    base, kernel_bytes = temp_bytes("none")
    nf4, _ = temp_bytes("nf4")
    assert nf4 - base < kernel_bytes // 4, (nf4, base, kernel_bytes)
