"""End-to-end runs of the training loop on the tiny model: events, checkpoints, resume."""

import os

import jax
import numpy as np
from helpers import init_state
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sftjax.build import build
from sftjax.params import flatten
from sftjax.train.checkpoint import Checkpointer
from sftjax.train.loop import run


def _trainable_at(cfg, workdir, step):
    setup = build(cfg)
    ckpt = Checkpointer(workdir, cfg.checkpoint)
    state = ckpt.restore(step, init_state(setup, cfg)[0])
    ckpt.close()
    return {k: np.asarray(v) for k, v in flatten(state.trainable).items()}, state


def test_two_steps_write_events_and_checkpoint_then_resume(tiny_config, tmp_path):
    wd = str(tmp_path / "run")
    res = run(tiny_config, wd)
    held = res["data"][tiny_config.data.train]["held_out"]  # a hashed 20% of the 20 records
    assert 0 < held < 10 and res["before"]["eval"]["examples"] == held and np.isfinite(res["after"]["eval"]["loss"])
    ev = EventAccumulator(os.path.join(wd, "tb"))
    ev.Reload()
    tags = ev.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu", "eval/loss"):
        assert tag in tags, tags
    assert 0 < ev.Scalars("train/mfu")[-1].value <= 1 and 0 < res["train_mfu"] <= 1  # CPU: against its measured peak
    assert "measured" in res["peak_source"]
    assert [e.step for e in ev.Scalars("train/loss")] == [1, 2]
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2"]

    # Same command with more steps resumes at 2 and goes on to 4 ...
    cfg4 = tiny_config.copy_and_resolve_references()
    cfg4.train.steps = 4
    run(cfg4, wd)
    ev = EventAccumulator(os.path.join(wd, "tb"))
    ev.Reload()
    assert sorted({e.step for e in ev.Scalars("train/loss")}) == [1, 2, 3, 4]
    resumed, state = _trainable_at(cfg4, wd, 4)
    assert int(state.step) == 4



def test_lora_frozen_untouched_and_opt_state_only_for_trainable(tiny_config):
    from helpers import file_batches

    from sftjax.parallel.mesh import place_batch
    from sftjax.train.step import make_train_step

    cfg = tiny_config
    setup = build(cfg)
    frozen_before = {k: np.array(v) for k, v in flatten(setup.frozen).items()}
    state, tx, sched = init_state(setup, cfg)
    # Optimizer state: Adam's mu and nu mirror the trainable (adapter) leaves and nothing else.
    n_train = sum(x.size for x in jax.tree.leaves(setup.trainable))
    opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in opt_leaves) == 2 * n_train
    assert all(k.endswith(("lora_a", "lora_b")) for k in flatten(setup.trainable))

    batches = file_batches(cfg, setup.tokenizer)
    step = make_train_step(setup.model, tx, sched, 1, False, 0)
    for _ in range(3):
        state, m = step(state, setup.frozen, place_batch(next(batches), setup.mesh))
    for k, v in flatten(setup.frozen).items():
        assert np.array_equal(np.asarray(v), frozen_before[k]), k
    assert float(m["loss"]) > 0


def test_partial_freezing_by_regex(tiny_config):
    cfg = tiny_config
    cfg.lora.enabled = False
    cfg.train.freeze = "regex"
    cfg.train.trainable = (r"mlp/", r"^norm/")
    setup = build(cfg)
    assert sorted(flatten(setup.trainable)) == ["layers/mlp/down_proj/kernel", "layers/mlp/gate_proj/kernel",
                                                 "layers/mlp/up_proj/kernel", "norm/scale"]
    assert "embed_tokens/embedding" in flatten(setup.frozen)


def test_sigterm_checkpoints_and_exits_cleanly(tiny_config, tmp_path, monkeypatch):
    """A SIGTERM during step 1 lets the step finish, saves it, and raises Interrupted; the same
    command then resumes from step 1."""
    import signal

    import pytest

    from sftjax.train.loop import Interrupted
    from sftjax.train.metrics import Writer

    cfg = tiny_config
    cfg.train.steps = 3
    cfg.checkpoint.every = 100  # only the signal-triggered and final saves
    wd = str(tmp_path / "run")
    real = Writer.scalars

    def scalars_then_signal(self, step, values, prefix=""):
        real(self, step, values, prefix)
        if prefix == "train/" and step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Writer, "scalars", scalars_then_signal)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="after step 1"):
        run(cfg, wd)
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the loop's handler is removed again
    assert os.listdir(os.path.join(wd, "checkpoints")) == ["1"]
    monkeypatch.setattr(Writer, "scalars", real)
    res = run(cfg, wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "3"]
    # The evaluation before training, from the interrupted run, is kept beside the final one.
    assert res["before"]["eval"]["examples"] == res["data"][cfg.data.train]["held_out"] > 0
    assert res["after"]["step"] == 3


def test_diverging_loss_is_a_clean_error(tiny_config, tmp_path):
    import pytest

    from sftjax.errors import UserError

    cfg = tiny_config
    cfg.lora.enabled = False
    cfg.optim.lr = 1e30
    cfg.optim.clip_norm = 0.0
    cfg.train.steps = 3
    with pytest.raises(UserError, match=r"train.on_nonfinite=stop: step [23]: the loss is (nan|inf)"):
        run(cfg, str(tmp_path / "run"))
