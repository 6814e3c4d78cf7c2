"""Numerics of the train step: micro-batch equivalence, mesh equivalence, compile-once, sharding checks,
no copy of the donated parameters."""

import re

import jax
import numpy as np
import optax
import pytest
from helpers import CountingModel, file_batches, init_state

from sftjax.build import build
from sftjax.errors import UserError
from sftjax.parallel.mesh import place_batch
from sftjax.params import flatten
from sftjax.train.step import make_train_step


def _steps(cfg, n=2, sgd=False):
    """Trainable params after n steps (and the losses). With sgd, the update is exactly -grad, so
    comparing results compares gradients rather than Adam's sign-like normalised steps."""
    setup = build(cfg)
    state, tx, sched = init_state(setup, cfg)
    if sgd:
        tx = optax.sgd(1.0)
        state = state.replace(opt_state=tx.init(state.trainable))
    batches = file_batches(cfg, setup.tokenizer)
    model = CountingModel(setup.model)
    fn = make_train_step(model, tx, sched, cfg.train.grad_accum, False, 0,
                         jax.tree.map(lambda x: x.sharding, state))
    losses = []
    for _ in range(n):
        state, m = fn(state, setup.frozen, place_batch(next(batches), setup.mesh))
        losses.append(float(m["loss"]))
    assert model.traces == 1  # traced (so compiled) once for all steps
    return {k: np.asarray(v) for k, v in flatten(state.trainable).items()}, losses


def _assert_close(a, b, rtol, base):
    """Updates `a` and `b` agree to `rtol` of their size. They are read back as (params after -
    params before), so a difference below the float32 spacing of the params (2 ulp) is rounding
    of the params, not of the update."""
    for k in a:
        scale = np.abs(a[k]).max() + 1e-12
        resolution = 2 * np.finfo(np.float32).eps * np.abs(base[k]).max()
        err = np.abs(a[k] - b[k]).max()
        assert err <= rtol * scale + resolution, (k, err / scale)


def test_grad_accumulation_equals_one_big_batch(tiny_config):
    cfg = tiny_config
    cfg.optim.clip_norm = 0.0
    cfg.lora.enabled = False
    base = {k: np.asarray(v) for k, v in flatten(build(cfg).trainable).items()}
    one, l1 = _steps(cfg, n=1, sgd=True)
    cfg.train.grad_accum = 4
    four, l4 = _steps(cfg, n=1, sgd=True)
    np.testing.assert_allclose(l1, l4, rtol=1e-6)
    # Updates (= minus the gradients, normalised by the global target-token count) agree.
    _assert_close({k: one[k] - base[k] for k in base}, {k: four[k] - base[k] for k in base}, 1e-6, base)


def test_compiles_once_over_steps_with_adamw(tiny_config):
    _, losses = _steps(tiny_config, n=3)
    assert all(np.isfinite(losses))


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


def test_step_does_not_copy_the_donated_parameters(tiny_config):
    """The state is donated and updated in place; nothing may read the old parameters after the
    update, or XLA keeps them readable by copying every trainable parameter at the start of the
    step (full fine-tuning of a 135M model: 0.5 GiB written and read again per step)."""
    cfg = tiny_config
    cfg.lora.enabled = False
    setup = build(cfg)
    state, tx, sched = init_state(setup, cfg)
    fn = make_train_step(setup.model, tx, sched, 1, False, 0, jax.tree.map(lambda x: x.sharding, state))
    batch = place_batch(next(file_batches(cfg, setup.tokenizer)), setup.mesh)
    hlo = fn.lower(state, setup.frozen, batch).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    # entry parameters that are arrays (the step counter, a scalar, is copied and may be)
    params = {name for name, dims in re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]\S* parameter\(\d+\)", entry) if dims}
    copied = [p for p in re.findall(r" copy\(%([\w.\-]+)\)", entry) if p in params]
    n_trainable = len(jax.tree.leaves(state.trainable))
    assert n_trainable > 5 and len(params) > n_trainable
    assert copied == [], f"{len(copied)} parameters copied: {copied[:4]}"
