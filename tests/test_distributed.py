"""Multi-process runs (launch/local.sh, `sftjax train --distributed`): two processes train like one
process on 2 devices, and a lost process ends the run promptly with a message naming it."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sftjax.errors import UserError
from sftjax.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SH = os.path.join(ROOT, "launch", "local.sh")


def _losses(workdir):
    ev = EventAccumulator(os.path.join(workdir, "tb"))
    ev.Reload()
    return [e.value for e in ev.Scalars("train/loss")]


def _config_file(tmp_path, model_dir, steps=3):
    cfg_file = tmp_path / "tiny.py"
    cfg_file.write_text(
        "from sftjax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
        f"    c.model.path = {model_dir!r}\n"
        f"    c.data.train = {os.path.join(ROOT, 'tests', 'data', 'chat.jsonl')!r}\n"
        f"    c.data.max_length = 64\n    c.data.buckets = 1\n    c.train.steps = {steps}\n    c.train.batch_size = 8\n"
        "    c.data.num_shards = 2\n    c.optim.lr = 1e-2\n    c.optim.warmup_steps = 0\n    c.checkpoint.every = 3\n    return c\n")
    return cfg_file


def _env(**extra):
    """One CPU device per process (conftest's 8 fake devices are for in-process tests), `sftjax` on PATH."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
                PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"], **extra)


def test_two_process_run_matches_single_process(tiny_model_dir, tmp_path):
    cfg_file = _config_file(tmp_path, tiny_model_dir)
    env = _env()
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    r = subprocess.run(["bash", LOCAL_SH, "2", f"--config={cfg_file}", f"--workdir={multi}"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "process 1 of 2 joined via explicit settings" in r.stderr and "process 0 of 2 joined" in r.stderr
    env1 = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    r = subprocess.run([sys.executable, "-m", "sftjax.cli", "train", f"--config={cfg_file}", f"--workdir={single}"],
                       env=env1, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lm, ls = _losses(multi), _losses(single)
    assert len(lm) == 3
    np.testing.assert_allclose(lm, ls, rtol=1e-5)
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["3"]


class _Watched:
    """A subprocess whose stderr is collected line by line, so a test can act when a line appears."""

    def __init__(self, cmd, env):
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()

    @property
    def text(self) -> str:
        with self._cv:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not (m := re.search(pattern, "".join(self.lines))):
                if time.monotonic() > deadline or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no {pattern!r} in stderr:\n{''.join(self.lines)[-3000:]}")
                self._cv.wait(0.2)
            return m

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill_all(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _train_cmd(cfg_file, workdir):
    return [sys.executable, "-m", "sftjax.cli", "train", "--distributed", f"--config={cfg_file}", f"--workdir={workdir}"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_local_sh_ends_the_run_when_a_process_dies(tiny_model_dir, tmp_path):
    """SIGKILL process 1 once it has joined: local.sh names it, ends process 0 and exits non-zero at once
    (SFTJAX_TIMEOUT_S is long here, so it is local.sh, not the heartbeat watch, that ends the run)."""
    cfg_file = _config_file(tmp_path, tiny_model_dir, steps=50)
    run = _Watched(["bash", LOCAL_SH, "2", f"--config={cfg_file}", f"--workdir={tmp_path / 'w'}"],
                   _env(SFTJAX_TIMEOUT_S="120"))
    try:
        pid0 = int(run.wait_for(r"process 0 is pid (\d+)", 30)[1])
        pid1 = int(run.wait_for(r"process 1 is pid (\d+)", 30)[1])
        run.wait_for(r"process 1 of 2 joined", 90)
        os.kill(pid1, signal.SIGKILL)
        killed = time.monotonic()
        rc = run.wait(30)
        took = time.monotonic() - killed
    finally:
        run.kill_all()
    assert rc == 128 + signal.SIGKILL, run.text[-3000:]
    assert f"process 1 (pid {pid1}) exited with status 137 (signal KILL); stopping the other 1" in run.text
    assert took < 15, took  # SIGTERM, then SIGKILL after 5 s at the latest
    assert _gone(pid0)


def test_survivor_names_the_process_that_died(tiny_model_dir, tmp_path):
    """Without a launcher to end it (a TPU pod, SLURM), process 0 notices process 1's missing
    heartbeats after SFTJAX_TIMEOUT_S and exits 75 with one error line naming it."""
    cfg_file = _config_file(tmp_path, tiny_model_dir, steps=50)
    port = 20000 + os.getpid() % 20000
    procs = [_Watched(_train_cmd(cfg_file, tmp_path / "w"),
                      _env(SFTJAX_COORDINATOR=f"localhost:{port}", SFTJAX_NUM_PROCESSES="2", SFTJAX_PROCESS_ID=str(i),
                           SFTJAX_TIMEOUT_S="5"))
             for i in range(2)]
    try:
        procs[1].wait_for(r"process 1 of 2 joined", 90)
        procs[0].wait_for(r"process 0 of 2 joined", 30)
        os.kill(procs[1].proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        rc = procs[0].wait(60)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill_all()
    assert rc == distributed.LOST, procs[0].text[-3000:]
    assert "error: process 1 stopped responding: no heartbeat for 5 s" in procs[0].text
    assert "Traceback" not in procs[0].text
    assert 3 <= took < 20, took  # T after process 0 last saw a beat from 1 (up to a beat before the kill), plus a beat


def test_join_times_out_naming_the_missing_process(tiny_model_dir, tmp_path):
    """A process whose partner never starts gives up after SFTJAX_TIMEOUT_S and says who it waited for:
    process 0 names process 1; process 1 names process 0, whose address does not answer."""
    cfg_file = _config_file(tmp_path, tiny_model_dir)
    base = 20000 + (os.getpid() + 7) % 20000
    procs = [_Watched(_train_cmd(cfg_file, tmp_path / f"w{i}"),
                      _env(SFTJAX_COORDINATOR=f"localhost:{base + i}", SFTJAX_NUM_PROCESSES="2",
                           SFTJAX_PROCESS_ID=str(i), SFTJAX_TIMEOUT_S="3"))
             for i in range(2)]  # different ports: each waits for a partner that never comes
    try:
        rcs = [p.wait(60) for p in procs]
    finally:
        for p in procs:
            p.kill_all()
    assert rcs == [distributed.LOST] * 2, [p.text[-2000:] for p in procs]
    assert "error: process 0: timed out after 3 s waiting for process 1 to join" in procs[0].text
    assert ("error: process 1: timed out after 3 s: process 0 (the coordinator) does not answer at "
            f"localhost:{base + 1}") in procs[1].text
    assert not any("Traceback" in p.text for p in procs)


def test_a_process_that_fails_alone_stops_the_others(tiny_model_dir, tmp_path):
    """Process 1 raises (a stand-in for a bug or a bad file on one host): it prints its traceback and
    exits 1; process 0 does not wait for it in a collective but exits 75 with its error at once."""
    cfg_file = _config_file(tmp_path, tiny_model_dir)
    wrapper = tmp_path / "fail_in_1.py"
    wrapper.write_text(
        "import os, sys\nimport sftjax.train.loop as loop\nfrom sftjax import cli\n\nreal = loop.run\n\n\n"
        "def run(cfg, workdir):\n    if os.environ['SFTJAX_PROCESS_ID'] == '1':\n"
        "        raise RuntimeError('disk full on this host')\n    return real(cfg, workdir)\n\n\n"
        "loop.run = run\nsys.exit(cli.main(sys.argv[1:]))\n")
    port = 20000 + (os.getpid() + 13) % 20000
    procs = [_Watched([sys.executable, str(wrapper), "train", "--distributed", f"--config={cfg_file}",
                       f"--workdir={tmp_path / 'w'}"],
                      _env(SFTJAX_COORDINATOR=f"localhost:{port}", SFTJAX_NUM_PROCESSES="2", SFTJAX_PROCESS_ID=str(i),
                           SFTJAX_TIMEOUT_S="10"))
             for i in range(2)]
    try:
        rcs = [p.wait(90) for p in procs]
    finally:
        for p in procs:
            p.kill_all()
    assert rcs == [distributed.LOST, 1], [p.text[-2000:] for p in procs]
    assert "RuntimeError: disk full on this host" in procs[1].text
    assert "error: process 1 failed (RuntimeError: disk full on this host)" in procs[0].text
    assert "Traceback" not in procs[0].text


def test_timeout_setting_is_checked():
    assert distributed.timeout_s({}) == distributed.DEFAULT_TIMEOUT_S
    assert distributed.timeout_s({"SFTJAX_TIMEOUT_S": "30"}) == 30
    for bad in ("0", "-1", "5m"):
        with pytest.raises(UserError, match="SFTJAX_TIMEOUT_S"):
            distributed.timeout_s({"SFTJAX_TIMEOUT_S": bad})
    with pytest.raises(UserError, match="SFTJAX_PROCESS_ID=2 must be in 0..1"):
        distributed._explicit({"SFTJAX_COORDINATOR": "localhost:1", "SFTJAX_NUM_PROCESSES": "2",
                               "SFTJAX_PROCESS_ID": "2"})
