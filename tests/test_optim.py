"""Optimizers: state only for trainable leaves, and the path-masked weight decay for each of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import first_batch

from sftjax.config import base_config, validate
from sftjax.errors import UserError
from sftjax.params import flatten
from sftjax.train.optim import make_optimizer


def _tree():
    rng = np.random.default_rng(0)
    return {"layers": {"mlp": {"up_proj": {"kernel": jnp.asarray(rng.standard_normal((2, 256, 128)), jnp.float32)}},
                       "input_layernorm": {"scale": jnp.ones((2, 256))}},
            "lm_head": {"kernel": jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)}}


def _state_size(state) -> int:
    return sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
def test_state_size_and_masked_weight_decay(name):
    cfg = base_config().optim
    cfg.name, cfg.warmup_steps, cfg.weight_decay = name, 0, 0.1
    params = _tree()
    n = sum(x.size for x in jax.tree.leaves(params))
    tx, _ = make_optimizer(cfg, params, 10)
    state = tx.init(params)
    size = _state_size(state)
    if name == "adamw":
        assert size == 2 * n  # mu and nu, one each per trainable parameter
    elif name == "lion":
        assert size == n  # one moment
    else:
        # Factored row + column statistics for up_proj (both sides >= 128): 2 x (256 + 128), not
        # 2 x 256 x 128; lm_head (64 < 128) and the norm scales keep a full second moment.
        assert 256 * 64 + 2 * 256 + 2 * (256 + 128) <= size < 256 * 64 + 2 * 256 + 2 * (256 + 128) + 16
    # Zero gradients: the only update is weight decay, lr * wd * param on decayed paths, none on scale$.
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    up = flatten(updates)
    assert not np.asarray(up["layers/input_layernorm/scale"]).any()
    kernel = np.asarray(flatten(params)["lm_head/kernel"])
    np.testing.assert_allclose(np.asarray(up["lm_head/kernel"]), -cfg.lr * 0.1 * kernel, rtol=1e-5, atol=1e-12)


def test_optimizers_train_the_tiny_model(tiny_config):
    """Every optimizer runs the real step on a frozen-base LoRA model; loss goes down; state is
    built over the trainable subtree only (adapters), so frozen leaves hold none."""
    from helpers import init_state

    from sftjax.build import build
    from sftjax.train.step import make_train_step

    cfg = tiny_config
    setup = build(cfg)
    batch = first_batch(setup, cfg)
    init = setup.trainable
    for name, lr in (("adamw", 1e-2), ("adafactor", 1e-2), ("lion", 1e-3)):
        cfg.optim.name, cfg.optim.lr = name, lr
        setup.trainable = jax.tree.map(jnp.copy, init)  # the step donates (deletes) its input state
        state, tx, sched = init_state(setup, cfg)
        assert _state_size(state.opt_state) <= 2 * sum(x.size for x in jax.tree.leaves(setup.trainable))
        step = make_train_step(setup.model, tx, sched, 1, False, 0)
        losses = []
        for _ in range(4):  # the same batch: the loss must fall
            state, m = step(state, setup.frozen, batch)
            losses.append(float(m["loss"]))
        assert losses[-1] < losses[0], (name, losses)


def test_unknown_optimizer_names_the_key():
    c = base_config()
    c.optim.name = "sgd"
    with pytest.raises(UserError, match="optim.name: 'sgd' is not one of adamw, adafactor, lion"):
        validate(c)
