"""Preemption through the CLI: SIGTERM saves and exits 0, kill -9 loses at most the steps since the
last checkpoint; either way the resumed run ends bit-identical to an uninterrupted one."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sftjax.build import build
from sftjax.config import to_json
from sftjax.params import flatten
from sftjax.train.checkpoint import trainable_at
from sftjax.train.loop import EXIT_GRACE, EXIT_SECOND_SIGNAL

STEPS = 12


def _cli(*args):
    """`sftjax ARGS` as users run it, without PyTorch (a test-only dependency here; transformers
    imports it when present, which doubles start-up)."""
    return [sys.executable, "-c", "import sys; sys.modules['torch'] = None; from sftjax.cli import main; "
            "sys.exit(main(sys.argv[1:]))", *args]


def _job(tiny_model_dir, d):
    """(config, config file, parameters of the uninterrupted CLI run)."""
    from sftjax.config import base_config

    c = base_config()
    c.model.path, c.data.train = tiny_model_dir, os.path.join(os.path.dirname(__file__), "data", "chat.jsonl")
    c.data.eval_fraction, c.data.max_length, c.mesh.data = 0.0, 64, 1  # no evaluation: the state is the point
    c.train.steps, c.train.batch_size, c.optim.lr, c.optim.warmup_steps = STEPS, 8, 1e-2, 0
    c.lora.dropout = 0.1  # the dropout masks depend on the step: they must line up after a resume
    c.data.buckets = 1  # one padded batch shape: each process compiles its step once, not once per bucket
    c.checkpoint.every, c.checkpoint.max_to_keep = 1, 3
    cfg_file = d / "cfg.py"
    cfg_file.write_text("from sftjax.config import from_json\n\n\ndef get_config():\n"
                        f"    c = from_json({to_json(c)!r})\n    c.unlock()\n    return c\n")
    straight = str(d / "straight")
    subprocess.run(_cli("train", f"--config={cfg_file}", f"--workdir={straight}"), check=True,
                   capture_output=True)
    return c, str(cfg_file), _params(c, straight)


def _params(cfg, workdir):
    step, trainable = trainable_at(workdir, build(cfg), cfg, "latest")
    assert step == STEPS
    return {k: np.asarray(v) for k, v in flatten(trainable).items()}


def _start_and_wait_for(cfg_file, workdir, step: int):
    p = subprocess.Popen(_cli("train", f"--config={cfg_file}", f"--workdir={workdir}"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(workdir, "checkpoints", str(step))):
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    return p


def _assert_equal(got, want):
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_sigterm_or_kill_9_then_resume_is_bit_identical(tiny_model_dir, tmp_path, monkeypatch):
    """One uninterrupted reference, then (1) SIGTERM after checkpoint 2: the step finishes, is saved,
    exit 0 well within the grace period, and the same command resumes; (2) kill -9 after a random
    checkpoint (2-6), then the same command. Both end with the reference's parameters, bit for bit."""
    # The five CLI processes compile the same step: the first writes it to a persistent compilation
    # cache the others load from (the same executable, so the bit-for-bit comparison is unaffected).
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla-cache"))
    cfg, cfg_file, want = _job(tiny_model_dir, tmp_path)

    wd = str(tmp_path / "sigterm")
    p = _start_and_wait_for(cfg_file, wd, 2)
    p.send_signal(signal.SIGTERM)
    t0 = time.time()
    _, err = p.communicate(timeout=120)
    took = time.time() - t0
    assert p.returncode == 0, err[-3000:]
    assert "stopped: signal 15: stopped after step" in err and "Traceback" not in err
    saved = max(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
    assert 2 <= saved < STEPS and took < cfg.train.stop_grace_secs
    r = subprocess.run(_cli("train", f"--config={cfg_file}", f"--workdir={wd}"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {os.path.join(wd, 'checkpoints')} at step {saved}" in r.stderr
    _assert_equal(_params(cfg, wd), want)

    wd = str(tmp_path / "kill9")
    p = _start_and_wait_for(cfg_file, wd, random.Random().randint(2, 6))
    p.kill()
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    r = subprocess.run(_cli("train", f"--config={cfg_file}", f"--workdir={wd}"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    _assert_equal(_params(cfg, wd), want)


_SIGNALS = """
import os, signal, sys, time
from sftjax.train.loop import StopRequest
with StopRequest(grace=float(sys.argv[1])):
    for _ in range(int(sys.argv[2])):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
    time.sleep(30)  # a step or a save that takes too long
"""


@pytest.mark.parametrize("grace,signals,code,says", [(0.5, 1, EXIT_GRACE, "train.stop_grace_secs=0.5 passed"),
                                                     (60, 2, EXIT_SECOND_SIGNAL, "second signal 15")])
def test_grace_period_and_second_signal_stop_at_once(grace, signals, code, says):
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", _SIGNALS, str(grace), str(signals)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == code and says in r.stderr, r.stderr
    assert time.time() - t0 < 25  # not the 30 s of work
