"""Numerics of the train step: micro-batch equivalence, mesh equivalence, compile-once, sharding checks."""

import jax
import numpy as np
import pytest

from sftjax.data import pipeline
from sftjax.errors import UserError
from sftjax.params import flatten
from sftjax.setup import build
from sftjax.sharding import place_batch
from sftjax.step import make_train_step
from sftjax.train import initial_state


def _steps(cfg, n=2):
    setup = build(cfg)
    state, tx, sched = initial_state(setup, cfg)
    train_rec, _ = pipeline.load_records(cfg)
    ex = pipeline.tokenize(train_rec, setup.tokenizer, cfg.data.max_length, "t")
    order = pipeline.batch_order(len(ex), cfg.train.batch_size, 0)
    fn = make_train_step(setup.model, tx, sched, cfg.train.grad_accum, False, 0)
    losses = []
    for i in range(n):
        state, m = fn(state, setup.frozen, place_batch(ex.batch(order[i]), setup.mesh))
        losses.append(float(m["loss"]))
    assert fn._cache_size() == 1  # compiled once for all steps
    return {k: np.asarray(v) for k, v in flatten(state.trainable).items()}, losses


def _assert_close(a, b, rtol):
    for k in a:
        scale = np.abs(a[k]).max() + 1e-12
        assert np.abs(a[k] - b[k]).max() / scale <= rtol, k


def test_grad_accumulation_equals_one_big_batch(tiny_config):
    cfg = tiny_config
    cfg.optim.clip_norm = 0.0
    one, l1 = _steps(cfg)
    cfg.train.grad_accum = 4
    four, l4 = _steps(cfg)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    _assert_close(one, four, 1e-5)


def test_eight_device_mesh_equals_one_device(tiny_config):
    cfg = tiny_config
    cfg.lora.enabled = False  # full fine-tuning: every parameter sharded across the mesh
    single, l1 = _steps(cfg)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    meshed, l8 = _steps(cfg)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    _assert_close(single, meshed, 1e-4)


def test_indivisible_dimension_raises_with_path(tiny_config):
    cfg = tiny_config
    cfg.mesh.tensor = 3  # q_proj's 4 heads x 16 = 64 outputs do not split 3 ways
    with pytest.raises(UserError, match=r"mesh: parameter layers/.* is not divisible by mesh axes \('tensor',\)"):
        build(cfg)


def test_mesh_larger_than_devices_raises(tiny_config):
    cfg = tiny_config
    cfg.mesh.data = 16
    with pytest.raises(UserError, match="only 8 devices"):
        build(cfg)
    assert jax.device_count() == 8
