import os
import subprocess
import sys

import pytest

from sftjax.config import load_config
from sftjax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quickstart.py")


def test_overrides_apply_with_types():
    cfg = load_config(QUICK, ["--config.optim.lr=3e-4", "--config.train.steps=7", "--config.lora.enabled=false",
                              "--config.lora.targets=('qv',)"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7 and cfg.lora.enabled is False
    assert cfg.lora.targets == ("qv",)


def test_unknown_override_key_raises_with_hint():
    with pytest.raises(UserError, match=r"unknown config key 'optim.lrr' \(did you mean 'lr'\?\)"):
        load_config(QUICK, ["--config.optim.lrr=1e-4"])


def test_unknown_key_in_file_raises(tmp_path):
    p = tmp_path / "c.py"
    p.write_text("from sftjax.config import base_config\n\ndef get_config():\n    c = base_config()\n"
                 "    c.train.stpes = 3\n    return c\n")
    with pytest.raises(UserError, match=r"unknown config key 'train.stpes' \(did you mean 'steps'\?\)"):
        load_config(str(p))


def test_bad_value_type_raises():
    with pytest.raises(UserError, match=r"--config.train.steps: 'ten' is not a valid int"):
        load_config(QUICK, ["--config.train.steps=ten"])


def test_cli_prints_one_clean_error_and_exits_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sftjax.cli", "train", f"--config={QUICK}",
                        f"--workdir={tmp_path / 'w'}", "--config.optim.lrr=1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --config.optim.lrr: unknown config key")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()  # nothing half-written


def test_cli_bad_data_line_is_clean_error(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    r = subprocess.run([sys.executable, "-m", "sftjax.cli", "train", f"--config={QUICK}", f"--workdir={tmp_path / 'w'}",
                        f"--config.data.train={data}", f"--config.model.path={tiny_model_dir}", "--config.mesh.data=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert f"error: {data}:2: malformed JSON" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.optim.schedule=cosin", "optim.schedule: 'cosin' is not one of cosine, linear, constant"),
    ("--config.model.dtype=fp16", "model.dtype: 'fp16' is not one of float32, bfloat16"),
    ("--config.train.steps=0", "train.steps: must be positive, got 0"),
    ("--config.train.grad_accum=3", "train.batch_size: 8 is not divisible by train.grad_accum=3"),
])
def test_bad_values_fail_at_load(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(QUICK, [override])


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py")))
def test_every_shipped_config_loads_and_documents_its_run_command(name):
    path = os.path.join(ROOT, "configs", name)
    cfg = load_config(path)
    assert cfg.data.train or cfg.data.mixture
    command = "selftrain" if name.endswith("_selftrain.py") else "train"  # self-training configs run with selftrain
    with open(path) as f:
        assert f"sftjax {command} --config=configs/" + name in f.read()
