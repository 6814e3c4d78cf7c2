"""Freezing strategies: unrolled layers equal scanned ones; frozen leaves stay bit-identical and
hold no optimizer state."""

import jax
import numpy as np
import pytest
from helpers import init_state

from sftjax.build import build
from sftjax.config import validate
from sftjax.errors import UserError
from sftjax.models import layout
from sftjax.params import flatten
from sftjax.peft import freeze


def test_unrolled_layers_equal_scanned(tiny_config):
    from sftjax.infer.generate import greedy

    cfg = tiny_config
    cfg.lora.enabled = False
    scanned = build(cfg)
    cfg.model.scan_layers = False
    unrolled = build(cfg)
    assert "layers_1/self_attn/q_proj/kernel" in flatten(unrolled.trainable)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 12)).astype(np.int32)
    a = np.asarray(scanned.model.apply(scanned.full_params(), ids))
    b = np.asarray(unrolled.model.apply(unrolled.full_params(), ids))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # The key/value cache path (generation) too.
    prompts = [ids[0, :5], ids[1, :7]]
    ga = greedy(scanned.model, scanned.full_params(), prompts, 6, None)
    gb = greedy(unrolled.model, unrolled.full_params(), prompts, 6, None)
    assert all(np.array_equal(x, y) for x, y in zip(ga, gb, strict=True))
    # stack(unstack(p)) is lossless, and merged params come back stacked for export.
    back = flatten(unrolled.merged_params())
    for k, v in flatten(scanned.full_params()).items():
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(v), err_msg=k)
    assert flatten(layout.unstack(scanned.full_params(), 2))["layers_0/mlp/up_proj/kernel"].shape == (64, 128)


def _two_steps(cfg):
    from helpers import file_batches

    from sftjax.parallel.mesh import place_batch
    from sftjax.train.step import make_train_step

    setup = build(cfg)
    frozen_before = {k: np.array(v) for k, v in flatten(setup.frozen).items()}
    train_before = {k: np.array(v) for k, v in flatten(setup.trainable).items()}
    state, tx, sched = init_state(setup, cfg)
    n_train = sum(x.size for x in jax.tree.leaves(setup.trainable))
    opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in opt_leaves) == 2 * n_train  # Adam's mu and nu for trainable leaves only
    batches = file_batches(cfg, setup.tokenizer)
    step = make_train_step(setup.model, tx, sched, 1, False, 0)
    for _ in range(2):
        state, _ = step(state, setup.frozen, place_batch(next(batches), setup.mesh))
    for k, v in flatten(setup.frozen).items():
        assert np.array_equal(np.asarray(v), frozen_before[k]), k
    after = flatten(state.trainable)
    assert all(not np.array_equal(np.asarray(after[k]), train_before[k]) for k in train_before)
    return sorted(flatten(setup.trainable)), sorted(frozen_before)


def test_last_layers_trains_only_the_last_layers_and_head(tiny_config):
    cfg = tiny_config
    cfg.lora.enabled = False
    cfg.model.scan_layers = False
    cfg.train.freeze = "last_layers"
    cfg.train.last_layers = 1
    trained, frozen = _two_steps(cfg)
    assert all(k.startswith(("layers_1/", "norm/", "lm_head/")) for k in trained)
    assert "lm_head/kernel" in trained and "layers_1/mlp/down_proj/kernel" in trained
    assert all(k.startswith(("layers_0/", "embed_tokens/")) for k in frozen) and "layers_0/mlp/up_proj/kernel" in frozen


def test_head_only(tiny_config):
    cfg = tiny_config
    cfg.lora.enabled = False
    cfg.train.freeze = "head"
    trained, _ = _two_steps(cfg)
    assert trained == ["lm_head/kernel", "norm/scale"]
    assert freeze.head_patterns(tied=True) == [r"^norm/", r"^embed_tokens/"]


def test_freezing_config_errors_name_the_key(tiny_config):
    cfg = tiny_config
    cfg.train.freeze = "head"
    with pytest.raises(UserError, match="train.freeze=head: .*set lora.enabled=False"):
        validate(cfg)
    cfg.lora.enabled = False
    cfg.train.freeze = "last_layers"
    with pytest.raises(UserError, match="model.scan_layers=False"):
        validate(cfg)
    cfg.model.scan_layers = False
    cfg.train.last_layers = 3
    with pytest.raises(UserError, match=r"train.last_layers: must be in 1..2"):
        build(cfg)
    cfg.train.freeze = "lastlayers"
    with pytest.raises(UserError, match="train.freeze: 'lastlayers' is not one of"):
        validate(cfg)
    cfg.train.freeze = "full"
    cfg.train.trainable = ("mlp/",)
    with pytest.raises(UserError, match="train.trainable: .*train.freeze=regex"):
        validate(cfg)
    cfg.train.freeze, cfg.train.trainable = "regex", ()
    with pytest.raises(UserError, match="train.trainable: train.freeze=regex needs at least one regex"):
        validate(cfg)
