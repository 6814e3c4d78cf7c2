"""Runs that go wrong or end early: non-finite steps, keep-best, early stopping, time-based saves,
unreadable checkpoints, a different base model."""

import logging
import os
import re

import jax
import numpy as np
import pytest
from helpers import first_batch, init_state

from sftjax.build import build
from sftjax.cli import main
from sftjax.errors import UserError
from sftjax.params import flatten
from sftjax.train import loop as L
from sftjax.train.checkpoint import CORRUPT, Checkpointer, pick, trainable_at
from sftjax.train.loop import run
from sftjax.train.step import make_train_step
from sftjax.train.workdir import read_json


def _flat(tree):
    return {k: np.asarray(v) for k, v in flatten(tree).items()}


def _trainable(cfg, workdir, which="latest"):
    step, trainable = trainable_at(workdir, build(cfg), cfg, which)
    return step, _flat(trainable)


def test_nonfinite_batch_leaves_params_and_optimizer_state_untouched(tiny_config):
    """A batch whose loss is infinite: the step reports it and returns the state it was given, bit
    for bit (parameters and AdamW moments); the next finite batch trains as usual."""
    cfg = tiny_config
    setup = build(cfg)
    state, tx, sched = init_state(setup, cfg)
    step = make_train_step(setup.model, tx, sched, 1, False, 0)
    batch = first_batch(setup, cfg)
    state, m = step(state, setup.frozen, batch)  # one real step: non-zero moments to compare
    assert int(m["nonfinite"]) == 0 and np.isfinite(float(m["update_ratio"])) and float(m["param_norm"]) > 0
    before = (_flat(state.trainable), [np.asarray(x) for x in jax.tree.leaves(state.opt_state)])
    poisoned = dict(batch, weights=batch["weights"].at[0, 3].set(np.inf))
    state, m = step(state, setup.frozen, poisoned)
    assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
    after = (_flat(state.trainable), [np.asarray(x) for x in jax.tree.leaves(state.opt_state)])
    for k in before[0]:  # bytes, so that a zero's sign counts too
        assert after[0][k].tobytes() == before[0][k].tobytes(), k
    for a, b in zip(after[1], before[1], strict=True):
        assert a.tobytes() == b.tobytes()
    state, m = step(state, setup.frozen, batch)
    assert int(m["nonfinite"]) == 0
    assert any(not np.array_equal(v, before[0][k]) for k, v in _flat(state.trainable).items())


def _poison_steps(monkeypatch, steps: set[int]):
    """Make the loss of the given (1-based) steps infinite, through the batches the loop places."""
    real, seen = L.place_batch, [0]

    def place(batch, *a, **kw):
        seen[0] += 1
        if seen[0] in steps:
            batch = dict(batch, weights=np.where(batch["weights"] > 0, np.inf, 0.0).astype(np.float32))
        return real(batch, *a, **kw)

    monkeypatch.setattr(L, "place_batch", place)


def test_on_nonfinite_skip_counts_and_stop_names_the_step(tiny_config, tmp_path, monkeypatch, caplog):
    """Through `run` (max_nonfinite in a row is tests/test_hooks.py's)."""
    cfg = tiny_config
    cfg.train.steps, cfg.checkpoint.every, cfg.data.eval_fraction = 5, 100, 0.0
    cfg.train.on_nonfinite, cfg.train.max_nonfinite = "skip", 2
    _poison_steps(monkeypatch, {2, 4})  # not in a row: the run goes on
    res = run(cfg, str(tmp_path / "skip"))
    assert res["nonfinite_steps"] == 2 and res["after"]["step"] == 5
    assert re.search(r"step 2: the loss is (nan|inf).*update not applied", caplog.text)

    cfg.train.on_nonfinite = "stop"
    _poison_steps(monkeypatch, {3})
    with pytest.raises(UserError, match=r"train.on_nonfinite=stop: step 3: the loss is (nan|inf)"):
        run(cfg, str(tmp_path / "stop"))


def test_keep_best_and_latest_then_export_picks(tiny_config, tmp_path):
    """max_to_keep=1 plus the best by eval loss in 'max' mode (the worst loss: the first
    evaluation, since training lowers it): exactly {best, last} remain; --checkpoint=best/STEP pick them."""
    cfg = tiny_config
    cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every = 4, 1, 100
    cfg.checkpoint.max_to_keep, cfg.checkpoint.best_metric, cfg.checkpoint.best_mode = 1, "loss", "max"
    wd = str(tmp_path / "run")
    res = run(cfg, wd)
    assert res["best"]["metric"] == "loss" and res["best"]["step"] == 1
    kept = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
    assert kept == [1, 4]
    ckpt = Checkpointer(wd, cfg.checkpoint)
    try:
        assert ckpt.best() == (1, res["best"]["value"])
        assert pick(ckpt, "best") == [1] and pick(ckpt, "4") == [4] and pick(ckpt, "latest") == [1, 4]
        assert pick(ckpt, "auto") == [1, 4] and pick(ckpt, "auto", prefer_best=True) == [1]
        with pytest.raises(UserError, match=r"--checkpoint=3: not latest, best or a kept step \(1, 4\)"):
            pick(ckpt, "3")
    finally:
        ckpt.close()
    best_step, best = _trainable(cfg, wd, "best")
    last_step, last = _trainable(cfg, wd, "latest")
    assert (best_step, last_step) == (1, 4) and any(not np.array_equal(best[k], last[k]) for k in best)
    # `sftjax eval --checkpoint=best` reproduces that step's held-out loss; a missing step is an error.
    assert main(["eval", f"--workdir={wd}", "--checkpoint=best"]) == 0
    got = read_json(os.path.join(wd, "eval.json"))
    assert got["checkpoint"] == 1 and got["loss"] == pytest.approx(res["best"]["value"], rel=1e-5)
    assert main(["export", f"--workdir={wd}", f"--out={tmp_path / 'x'}", "--checkpoint=7"]) == 2


def test_early_stopping_stops_logs_why_and_keeps_the_best(tiny_config, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sftjax")
    cfg = tiny_config
    cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every = 8, 1, 100
    cfg.checkpoint.best_metric, cfg.early_stop.patience, cfg.early_stop.min_delta = "loss", 2, 1e6
    wd = str(tmp_path / "run")
    res = run(cfg, wd)
    # Step 1 sets the best; no later evaluation improves on it by 1e6: two evaluations later it stops.
    assert res["after"]["step"] == 3
    assert res["stopped"].startswith("early stopping: eval loss did not improve by more than 1e+06 for 2 evaluations")
    assert "stopping after step 3: early stopping" in caplog.text
    assert res["best"]["step"] == 3  # loss still falls, by less than min_delta: the best is the last
    assert res["after"]["eval"]["loss"] == pytest.approx(res["best"]["value"])


def test_time_based_saves(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.data.eval_fraction = 0.0  # no evaluation needed here
    cfg.train.steps, cfg.checkpoint.every, cfg.checkpoint.max_to_keep = 3, 100, 5
    cfg.checkpoint.every_minutes = 1e-6  # every step is past it
    wd = str(tmp_path / "run")
    run(cfg, wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2", "3"]


def _truncate_largest(step_dir: str) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 2)
    return big


def test_truncated_newest_checkpoint_falls_back_and_resumes_exactly(tiny_config, tmp_path, caplog):
    cfg = tiny_config
    cfg.data.eval_fraction = 0.0  # no evaluation needed here
    cfg.train.steps, cfg.checkpoint.max_to_keep = 3, 5
    straight = str(tmp_path / "straight")
    run(cfg, straight)
    want = _trainable(cfg, straight)[1]

    wd = str(tmp_path / "run")
    cfg2 = cfg.copy_and_resolve_references()
    cfg2.train.steps = 2
    run(cfg2, wd)
    _truncate_largest(os.path.join(wd, "checkpoints", "2"))
    res = run(cfg, wd)  # resumes from step 1, redoes step 2 and 3
    assert "checkpoints/2 cannot be read" in caplog.text and "trying the one before" in caplog.text
    assert res["after"]["step"] == 3
    assert [d.split("-")[0] for d in os.listdir(os.path.join(wd, CORRUPT))] == ["2"]  # set aside, not deleted
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2", "3"]
    got = _trainable(cfg, wd)[1]
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    # Nothing readable at all: one clear error, and the broken steps are kept aside.
    for s in ("1", "2", "3"):
        _truncate_largest(os.path.join(wd, "checkpoints", s))
    with pytest.raises(UserError, match=r"--workdir: no readable checkpoint in .*checkpoints: 3 \(.*; 2 \(.*; 1 \("):
        run(cfg, wd)
    assert len(os.listdir(os.path.join(wd, CORRUPT))) == 4


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model's architecture and tokenizer with other weights."""
    from sftjax.io.hf import write_hf_folder
    from sftjax.io.load import load_pretrained

    mcfg, params, tok = load_pretrained(tiny_model_dir)
    out = str(tmp_path_factory.mktemp("models") / "other-llama")
    write_hf_folder(out, mcfg, jax.tree.map(lambda x: x + np.float32(0.01), params), tok)
    return out


def test_a_different_base_is_an_error_naming_both(tiny_config, tmp_path, other_model_dir):
    cfg = tiny_config
    cfg.data.eval_fraction = 0.0  # no evaluation needed here
    cfg.train.steps = 1
    wd = str(tmp_path / "run")
    run(cfg, wd)
    other = cfg.copy_and_resolve_references()
    other.model.path, other.train.steps = other_model_dir, 2
    with pytest.raises(UserError, match=r"model.path: .*checkpoints/1 was trained on the base .*tiny-llama "
                                        r"\(fingerprint [0-9a-f]{16}\), but this run's base is .*other-llama"):
        run(other, wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1"]
    with pytest.raises(UserError, match="other-llama"):  # exporting/generating onto the other base too
        trainable_at(wd, build(other), other)
