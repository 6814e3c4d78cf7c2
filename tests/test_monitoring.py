"""Monitoring: what a training run shows in TensorBoard (read back from the event files) and on
the console (one `sftjax train` in a subprocess, without PyTorch, as a user without it runs it)."""

import logging
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import jax
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata
from tensorboard.util import tensor_util

from sftjax.config import base_config
from sftjax.train import hooks as H
from sftjax.train.metrics import HPARAM_METRICS, eval_line, flat_config, memory, summary

# transformers prints "PyTorch was not found..." when torch is absent; a None entry hides it.
NO_TORCH = "import sys; sys.modules['torch'] = None; from sftjax.cli import main; sys.exit(main(sys.argv[1:]))"
OWN_LINE = re.compile(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR) |train: |  |error: ")  # log, progress bar, continuation


def test_train_console_and_tensorboard(tiny_model_dir, tmp_path):
    """A 2-step two-source run (eval every step, a sample prompt, best loss kept): one test, so that
    parallel workers do not each train it."""
    tmp = tmp_path
    data = os.path.join(os.path.dirname(__file__), "data")
    (tmp / "c.py").write_text(f"""from sftjax.config import base_config


def get_config():
    c = base_config()
    c.model.path = {tiny_model_dir!r}
    c.data.mixture = (({os.path.join(data, "chat.jsonl")!r}, 0.75),
                      ({os.path.join(data, "formats", "sharegpt.jsonl")!r}, 0.25))
    c.data.eval_fraction, c.data.max_length = 0.2, 64
    c.data.buckets = 1
    c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 2, 8, 1, 1
    c.train.sample_prompts, c.train.sample_max_new_tokens = ("hi",), 2
    c.checkpoint.best_metric, c.mesh.data = "loss", 1
    return c
""")
    wd = str(tmp / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "TF_CPP_MIN_LOG_LEVEL")}
    p = subprocess.run([sys.executable, "-c", NO_TORCH, "train", f"--config={tmp / 'c.py'}", f"--workdir={wd}"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    _check_console(p.stderr, wd)
    _check_events(wd)


def _check_console(stderr: str, wd: str):
    assert "PyTorch was not found" not in stderr
    lines = [ln for ln in re.split(r"[\r\n]", stderr) if ln.strip()]
    assert [ln for ln in lines if not OWN_LINE.match(ln)] == []
    evals = [ln for ln in lines if re.search(r" INFO eval (before|at step|after) ", ln)]
    assert len(evals) == 3 and "eval at step 1: loss " in evals[1] and "; best loss " in evals[1], evals
    assert "run summary: 2/2 steps in " in stderr and "best: eval loss " in stderr
    assert f"tensorboard --logdir {os.path.join(wd, 'tb')}" in stderr


def _check_events(wd: str):
    ev = EventAccumulator(os.path.join(wd, "tb"), size_guidance={"tensors": 0, "scalars": 0})
    ev.Reload()
    tags = ev.Tags()
    want = ["train/loss", "train/param_norm", "train/update_ratio", "train/step_secs", "train/host_rss_bytes",
            "train/host_rss_peak_bytes", "eval/loss", "eval/perplexity", "eval/token_accuracy",
            "eval/exact_match", "eval/loss/chat", "train/loss/sharegpt"]
    for tag in want:
        assert tag in tags["scalars"], (tag, tags["scalars"])
        assert all(math.isfinite(e.value) for e in ev.Scalars(tag)), tag
    assert [e.step for e in ev.Scalars("train/step_secs")] == [2]  # after the compile step only
    assert [e.step for e in ev.Scalars("eval/loss")] == [0, 1, 2]
    assert ev.Scalars("train/param_norm")[-1].value > 0 < ev.Scalars("train/host_rss_bytes")[-1].value
    has_device_stats = bool(jax.local_devices()[0].memory_stats())  # CPU: none, and no device tags
    assert ("train/device_bytes_in_use" in tags["scalars"]) == has_device_stats

    sample = tensor_util.make_ndarray(ev.Tensors("samples/0/text_summary")[-1].tensor_proto).item().decode()
    assert sample.startswith("**prompt** hi\n\n**before** ") and "**after** " in sample

    content = ev.PluginTagToContent("hparams")
    hparams = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG]).hparams
    assert hparams["train.steps"].number_value == 2 and hparams["checkpoint.best_metric"].string_value == "loss"
    assert hparams["model.scan_layers"].bool_value is True
    assert hparams["train.sample_prompts"].string_value == "hi"
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAM_METRICS)
    tb = os.path.join(wd, "tb")  # one event folder: add_hparams would have made a second, timestamped one
    assert all(os.path.isfile(os.path.join(tb, f)) for f in os.listdir(tb))


def test_flat_config_takes_the_types_hparams_takes():
    flat = flat_config(base_config())
    assert flat["optim.lr"] == 2e-4 and flat["lora.targets"] == "qv" and flat["mesh.rules.layers"] == ""
    assert flat["data.quality"] == "empty,repetition" and flat["model.scan_layers"] is True
    assert flat_config({"d": {"mixture": (("a.jsonl", 0.5),), "x": None}}) == {"d.mixture": '[["a.jsonl", 0.5]]',
                                                                              "d.x": "None"}


def test_memory_reports_host_rss_and_device_bytes_where_known():
    m = memory()
    assert m["host_rss_peak_bytes"] >= m["host_rss_bytes"] > 1e6
    assert ("device_bytes_in_use" in m) == ("bytes_in_use" in (jax.local_devices()[0].memory_stats() or {}))


def test_eval_line_is_one_compact_line():
    ev = {"loss": 1.23456, "perplexity": 3.4368, "token_accuracy": 0.6123, "exact_match": 0.125, "examples": 8,
          "loss/chat": 1.2}
    assert eval_line("at step 20", ev) == ("eval at step 20: loss 1.2346, ppl 3.44, token acc 61.2%, "
                                           "exact match 12.5% (8 examples)")
    best = {"metric": "exact_match", "value": 0.25, "step": 10}
    assert eval_line("after training", ev, best).endswith("(8 examples); best exact_match 0.2500 at step 10")


def test_evaluate_hook_line_weighs_in_the_current_evaluation(caplog):
    caplog.set_level(logging.INFO, logger="sftjax")
    writer = SimpleNamespace(scalars=lambda *a: None)
    losses = iter([3.0, 2.0, 2.5])
    hook = H.Evaluate(lambda t: {"loss": next(losses)}, every=1, writer=writer, best=("loss", "min"))
    loop = SimpleNamespace(start=0, steps=3, done=3, results={"before": {}, "after": {}})
    state = SimpleNamespace(trainable=None)
    hook.start(loop, state)  # step 0: no checkpoint, so no best yet
    hook.after_step(loop, 1, state, None, None)
    loop.results["best"] = {"metric": "loss", "value": 2.0, "step": 1}  # as the Checkpoint hook records it
    hook.after_step(loop, 2, state, None, None)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["eval before training: loss 3.0000", "eval at step 1: loss 2.0000; best loss 2.0000 at step 1",
                     "eval at step 2: loss 2.5000; best loss 2.0000 at step 1"]


def test_log_hparams_only_on_a_fresh_run():
    written = []
    hook = H.LogHparams(SimpleNamespace(hparams=written.append), "CFG")
    hook.start(SimpleNamespace(start=0), None)
    hook.start(SimpleNamespace(start=5), None)
    assert written == ["CFG"]


def test_summary_lines():
    results = {"train_loss": 0.51234, "best": {"metric": "loss", "value": 0.7, "step": 40},
               "stopped": "early stopping: eval loss did not improve", "checkpoints": "/w/checkpoints"}
    assert summary(results, "/w", 60, 100, 125.0).splitlines() == [
        "run summary: 60/100 steps in 2m05s, final train loss 0.5123",
        "  best: eval loss 0.7000 at step 40",
        "  stopped early: early stopping: eval loss did not improve",
        "  checkpoints: /w/checkpoints",
        "  tensorboard: tensorboard --logdir /w/tb"]
    assert summary({}, "/w", 3, 3, 12.34).splitlines()[0] == "run summary: 3/3 steps in 12.3 s"
    assert "in 2h00m" in summary({}, "/w", 3, 3, 7200)
