"""The training loop and each of its hooks alone, with stand-ins for the step, data and writers."""

import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest

from sftjax.errors import UserError
from sftjax.train import hooks as H
from sftjax.train.loop import Interrupted, Loop


class Recorder(H.Hook):
    def __init__(self, log):
        self.log = log

    def start(self, loop, state):
        self.log.append(("start", loop.start, state))

    def after_step(self, loop, done, state, metrics, batch):
        self.log.append(("after_step", done, state))

    def end(self, loop, state):
        self.log.append(("end", state))

    def close(self):
        self.log.append(("close",))


class FakeWriter:
    def __init__(self):
        self.scalars_at, self.texts = [], []

    def scalars(self, step, values, prefix=""):
        self.scalars_at.append((step, prefix, dict(values)))

    def text(self, step, tag, text):
        self.texts.append((step, tag, text))


def _loop(hooks, steps=3, start=0, step_fn=None):
    batches = iter(lambda: {"valid": np.ones((2, 4), bool)}, None)
    step_fn = step_fn or (lambda state, frozen, batch: (state + 1, {"loss": np.float32(1.0), "lr": np.float32(0.1)}))
    loop = Loop(step_fn, None, batches, None, steps, hooks, start=start, results={"before": {}})
    return loop


@pytest.fixture(autouse=True)
def _no_device_placement(monkeypatch):
    monkeypatch.setattr("sftjax.train.loop.place_batch", lambda batch, mesh, local, rules: batch)


def test_loop_calls_hooks_in_order_and_closes_them():
    log = []
    loop = _loop([Recorder(log)], steps=3, start=1)
    assert loop.run(10) == 12
    assert log == [("start", 1, 10), ("after_step", 2, 11), ("after_step", 3, 12), ("end", 12), ("close",)]
    assert loop.results["after"] == {"step": 3}


def test_loop_closes_hooks_on_error_and_skips_end():
    log = []

    def boom(state, frozen, batch):
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError):
        _loop([Recorder(log)], step_fn=boom).run(0)
    assert log == [("start", 0, 0), ("close",)]


def test_signal_finishes_the_step_lets_hooks_save_then_raises():
    saved = []

    class Save(H.Hook):
        def after_step(self, loop, done, state, metrics, batch):
            if done == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives during the loop, handled as a request
            if loop.stopping:
                saved.append(done)

    loop = _loop([Save()], steps=5)
    with pytest.raises(Interrupted, match="after step 1"):
        loop.run(0)
    assert saved == [1]  # hooks acting after the signal (e.g. Checkpoint) see it in the same step
    assert loop._request._timer.finished.is_set()  # the grace timer ends with the run, not the process
    held = _loop([Save()], steps=5)
    held.keep_grace = True  # as train.loop.run does: the timer also bounds its wait for the async save
    with pytest.raises(Interrupted):
        held.run(0)
    assert not held._request._timer.finished.is_set()
    held.release()
    assert held._request._timer.finished.is_set()


class FakeCheckpointer:
    def __init__(self, metric="", mode="min"):
        self.metric, self.mode, self.dir, self.saves = metric, mode, "CK", []

    def save(self, step, state, data, metrics=None):
        self.saves.append((step, metrics))

    def steps(self):
        return [s for s, _ in self.saves]

    def due(self):
        return False

    def best(self):
        return None


def _hook_loop(steps=5, **kw):
    """What hooks read of a Loop, as plain attributes."""
    attrs = dict(steps=steps, start=0, stopping=False, signalled=False, last_eval=(None, None), done=steps,
                 results={"before": {}, "after": {}})
    return SimpleNamespace(**{**attrs, **kw})


def test_checkpoint_hook_every_n_at_end_and_on_stop():
    ckpt = FakeCheckpointer()
    hook = H.Checkpoint(ckpt, every=2, loader="L")
    loop = _hook_loop()
    hook.start(loop, None)
    for done in range(1, 6):
        hook.after_step(loop, done, None, None, None)
    assert ckpt.steps() == [2, 4, 5] and loop.results["checkpoints"] == "CK"
    loop.stopping = True
    hook.after_step(loop, 1, None, None, None)
    assert ckpt.steps()[-1] == 1


def test_checkpoint_hook_saves_each_evaluation_with_its_metrics_and_tracks_the_best():
    ckpt = FakeCheckpointer("loss", "min")
    hook = H.Checkpoint(ckpt, every=100, loader="L")
    loop = _hook_loop(steps=4)
    hook.start(loop, None)
    for done, loss in ((1, 3.0), (2, 2.0), (3, 2.5)):
        loop.last_eval = (done, {"loss": loss})
        hook.after_step(loop, done, None, None, None)
    hook.after_step(loop, 4, None, None, None)  # the last step: saved by `end`, with the final evaluation
    assert ckpt.saves == [(1, {"loss": 3.0}), (2, {"loss": 2.0}), (3, {"loss": 2.5})]
    loop.last_eval = (4, {"loss": 1.5})
    hook.end(loop, None)
    assert ckpt.saves[-1] == (4, {"loss": 1.5}) and loop.results["best"] == {"metric": "loss", "value": 1.5, "step": 4}
    loop.results.pop("best")
    with pytest.raises(UserError, match="checkpoint.best_metric: this run's evaluation has no 'loss'; it reports acc"):
        H.Checkpoint(ckpt, 1, "L").start(_hook_loop(last_eval=(0, {"acc": 1.0, "examples": 3})), None)


def test_nonfinite_hook_reads_one_step_late_then_stops_or_skips():
    flags = {1: 0, 2: 1, 3: 1, 4: 0}
    metrics = {d: {"nonfinite": np.int32(f), "loss": np.float32("nan" if f else 1.0), "grad_norm": np.float32(1.0)}
               for d, f in flags.items()}
    hook = H.NonFinite("stop", 5, last_checkpoint=lambda: 1)
    loop = _hook_loop(steps=4)
    hook.after_step(loop, 1, None, metrics[1], None)
    hook.after_step(loop, 2, None, metrics[2], None)  # step 2's flag is read after step 3 is dispatched
    with pytest.raises(UserError, match="train.on_nonfinite=stop: step 2: the loss is nan, .*the last checkpoint is "
                                        "step 1"):
        hook.after_step(loop, 3, None, metrics[3], None)
    skip, loop = H.NonFinite("skip", 3, last_checkpoint=lambda: 1), _hook_loop(steps=4)
    for d in (1, 2, 3, 4):
        skip.after_step(loop, d, None, metrics[d], None)  # step 4 is the last: its own flag is read at once
    assert loop.results["nonfinite_steps"] == 2 and skip.in_row == 0
    two = H.NonFinite("skip", 2, last_checkpoint=lambda: 1)
    with pytest.raises(UserError, match="train.max_nonfinite=2: 2 non-finite steps in a row, the last at 3"):
        for d in (1, 2, 3, 4):
            two.after_step(_hook_loop(steps=4), d, None, metrics[d], None)


def test_early_stop_hook_counts_evaluations_without_enough_gain():
    stops = []
    hook = H.EarlyStop("accuracy", "max", patience=2, min_delta=0.01)
    loop = _hook_loop(steps=10, request_stop=stops.append)
    for done, acc in ((1, 0.50), (2, 0.505), (3, 0.60), (4, 0.60), (5, 0.605)):
        loop.last_eval = (done, {"accuracy": acc})
        hook.after_step(loop, done, None, None, None)
        hook.after_step(loop, done + 100, None, None, None)  # steps without an evaluation change nothing
    assert stops == ["early stopping: eval accuracy did not improve by more than 0.01 for 2 evaluations "
                     "(best 0.6000 at step 3)"]


def test_evaluate_hook_before_every_and_after():
    evals, writer = [], FakeWriter()
    hook = H.Evaluate(lambda trainable: evals.append(trainable) or {"loss": 1.0}, every=2, writer=writer)
    state = SimpleNamespace(trainable="T")
    loop = _hook_loop(steps=4)
    hook.start(loop, state)
    for done in range(1, 5):
        hook.after_step(loop, done, state, None, None)
    hook.end(loop, state)
    # before, step 2 (step 4 is the last: the end evaluates it), after
    assert [s for s, _, _ in writer.scalars_at] == [0, 2, 4]
    assert loop.results["before"]["eval"] == loop.results["after"]["eval"] == {"loss": 1.0}
    resumed = SimpleNamespace(start=3, steps=4, results={})
    hook.start(resumed, state)  # a resumed run does not evaluate "before" again
    assert "before" not in resumed.results


def test_log_metrics_every_n_with_throughput():
    writer = FakeWriter()
    hook = H.LogMetrics(every=2, writer=writer, names=["a"])
    loop = SimpleNamespace(start=0, steps=3, results={})
    hook.start(loop, None)
    batch = {"valid": np.array([[True, True, False, False]])}
    metrics = {"loss": np.float32(0.5), "lr": np.float32(1e-3)}
    for done in (1, 2, 3):
        hook.after_step(loop, done, None, metrics, batch)
    assert [s for s, _, _ in writer.scalars_at] == [2, 3]  # every 2 and the last step
    assert loop.results["nonpad_fraction"] == 0.5 and loop.results["train_tokens_per_sec"] > 0
    assert "tokens_per_sec" in writer.scalars_at[0][2]  # after the compile step
    hook.close()


def test_samples_hook_generates_before_and_after(monkeypatch):
    calls = []
    monkeypatch.setattr(H, "samples", lambda setup, trainable, convs, n: calls.append(trainable) or ["reply"])
    writer = FakeWriter()
    hook = H.Samples(None, [[{"role": "user", "content": "hi"}]], 8, writer)
    loop = SimpleNamespace(start=0, steps=2, results={"before": {}, "after": {}})
    hook.start(loop, SimpleNamespace(trainable="before"))
    hook.end(loop, SimpleNamespace(trainable="after"))
    assert calls == ["before", "after"] and loop.results["sample_prompts"] == ["hi"]
    assert writer.texts == [(2, "samples/0", "**prompt** hi\n\n**before** reply\n\n**after** reply")]
