"""Two processes joined by jax.distributed (launch/local.sh) train like one process on 2 devices."""

import os
import subprocess
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
    ev = EventAccumulator(os.path.join(workdir, "tb"))
    ev.Reload()
    return [e.value for e in ev.Scalars("train/loss")]


def test_two_process_run_matches_single_process(tiny_model_dir, tmp_path):
    cfg_file = tmp_path / "tiny.py"
    cfg_file.write_text(
        "from sftjax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
        f"    c.model.path = {tiny_model_dir!r}\n"
        f"    c.data.train = {os.path.join(ROOT, 'tests', 'data', 'chat.jsonl')!r}\n"
        "    c.data.max_length = 64\n    c.train.steps = 3\n    c.train.batch_size = 8\n"
        "    c.data.num_shards = 2\n    c.optim.lr = 1e-2\n    c.optim.warmup_steps = 0\n    c.checkpoint.every = 3\n    return c\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", f"--config={cfg_file}",
                        f"--workdir={multi}"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "process 1 of 2" in r.stderr and "process 0 of 2" in r.stderr
    env1 = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    r = subprocess.run([sys.executable, "-m", "sftjax.cli", "train", f"--config={cfg_file}", f"--workdir={single}"],
                       env=env1, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lm, ls = _losses(multi), _losses(single)
    assert len(lm) == 3
    np.testing.assert_allclose(lm, ls, rtol=1e-5)
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["3"]
