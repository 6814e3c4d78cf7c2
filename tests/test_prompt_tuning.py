"""Prompt tuning and prefix tuning: only the prompt trains, and the loss falls."""

import jax
import numpy as np
import pytest
from helpers import first_batch

from sftjax.params import flatten


def _train(cfg, steps=4):
    from helpers import init_state

    from sftjax.build import build
    from sftjax.train.step import make_train_step

    setup = build(cfg)
    frozen_before = {k: np.array(v) for k, v in flatten(setup.frozen).items()}
    train_before = {k: np.array(v) for k, v in flatten(setup.trainable).items()}
    state, tx, sched = init_state(setup, cfg)
    batch = first_batch(setup, cfg)
    step = make_train_step(setup.model, tx, sched, 1, False, 0)
    losses = []
    for _ in range(steps):  # the same batch: a trainable prompt must lower its loss
        state, m = step(state, setup.frozen, batch)
        losses.append(float(m["loss"]))
    for k, v in flatten(setup.frozen).items():
        assert np.array_equal(np.asarray(v), frozen_before[k]), k
    after = flatten(state.trainable)
    assert all(not np.array_equal(np.asarray(after[k]), v) for k, v in train_before.items())
    return setup, state, losses


@pytest.mark.parametrize("scan", [True, False])
def test_prefix_tuning_trains_only_the_prefixes(tiny_config, scan):
    cfg = tiny_config
    cfg.lora.enabled = False
    cfg.model.scan_layers = scan
    cfg.prompt_tuning.method, cfg.prompt_tuning.length = "prefix", 4
    setup, state, losses = _train(cfg)
    keys = sorted(flatten(state.trainable))
    if scan:
        assert keys == ["layers/self_attn/prefix_k", "layers/self_attn/prefix_v"]
        assert flatten(state.trainable)["layers/self_attn/prefix_k"].shape == (2, 4, 2, 16)
    else:
        assert len(keys) == 4 and all(k.startswith(("layers_0/self_attn/prefix_", "layers_1/self_attn/prefix_"))
                                      for k in keys)
    assert losses[-1] < losses[0], losses
    # Generation with the key/value cache sees the prefixes too.
    _assert_greedy_matches_full_forward(setup.model, setup.full_params(state.trainable))


def test_prompt_tuning_trains_only_the_prompt(tiny_config):
    cfg = tiny_config
    cfg.lora.enabled = False
    cfg.prompt_tuning.method, cfg.prompt_tuning.length = "prompt", 4
    setup, state, losses = _train(cfg)
    assert sorted(flatten(state.trainable)) == ["prompt_embedding"]
    assert flatten(state.trainable)["prompt_embedding"].shape == (4, 64)
    assert losses[-1] < losses[0], losses
    # The logits are for the real tokens only, and the prompt does change them.
    ids = np.random.default_rng(0).integers(0, 1000, (2, 9)).astype(np.int32)
    out = np.asarray(setup.model.apply(setup.full_params(state.trainable), ids))
    base = np.asarray(setup.model.apply(setup.frozen, ids))
    assert out.shape == base.shape == (2, 9, 49152) and np.abs(out - base).max() > 1e-3
    # Only the virtual tokens train: 4 x 64 parameters.
    assert sum(x.size for x in jax.tree.leaves(state.trainable)) == 256
    _assert_greedy_matches_full_forward(setup.model, setup.full_params(state.trainable))


def _assert_greedy_matches_full_forward(model, params, n=3):
    """Cached greedy decoding (two rows of different lengths, so one is left-padded) produces the
    tokens that repeated full forward passes pick."""
    from sftjax.infer.generate import greedy

    prompts = [np.arange(5, 12, dtype=np.int32), np.arange(20, 24, dtype=np.int32)]
    got = greedy(model, params, prompts, n, None)
    for p, g in zip(prompts, got, strict=True):
        seq = list(p)
        for _ in range(n):
            logits = np.asarray(model.apply(params, np.asarray([seq], np.int32)))
            seq.append(int(np.argmax(logits[0, -1])))
        assert list(g) == seq[len(p):], (list(g), seq[len(p):])


def test_prompt_tuning_with_lora_names_the_key(tiny_config):
    from sftjax.config import validate
    from sftjax.errors import UserError

    tiny_config.prompt_tuning.method = "prompt"
    with pytest.raises(UserError, match="prompt_tuning.method=prompt: .*lora.enabled=False"):
        validate(tiny_config)
