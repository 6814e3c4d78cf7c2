"""`sftjax ablate`: each layout in its own process, one table, losses compared."""

import csv
import os

import pytest

from sftjax.cli import main
from sftjax.errors import UserError
from sftjax.parallel.ablate import parse_meshes, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_layouts_one_table(tiny_model_dir, tmp_path, capsys):
    cfg = tmp_path / "tiny.py"
    cfg.write_text(
        "from sftjax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
        f"    c.model.path = {tiny_model_dir!r}\n"
        f"    c.data.train = {os.path.join(ROOT, 'tests', 'data', 'chat.jsonl')!r}\n"
        "    c.data.max_length = 64\n    c.data.buckets = 1\n    c.data.max_eval_examples = 2\n    c.train.batch_size = 8\n"
        "    c.optim.lr = 1e-2\n    c.optim.warmup_steps = 0\n    return c\n")
    wd = str(tmp_path / "abl")
    rc = main(["ablate", f"--config={cfg}", "--meshes=8,1,1 1,2,4", "--steps=2", f"--workdir={wd}",
               "--config.lora.rank=4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "losses agree" in out
    with open(os.path.join(wd, "ablation.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["mesh"] for r in rows] == ["8x1x1", "1x2x4"]
    for r in rows:
        assert float(r["s/step"]) > 0 and float(r["tokens/s"]) > 0 and float(r["compile s"]) > 0
        assert r["MFU"].endswith("%") and float(r["final loss"]) > 0
    assert abs(float(rows[1]["loss diff"])) < 1e-4
    for m in ("8x1x1", "1x2x4"):  # one TensorBoard run per layout
        assert os.listdir(os.path.join(wd, f"mesh_{m}", "tb"))
    # Never resumes an earlier layout run by accident.
    assert main(["ablate", f"--config={cfg}", "--meshes=8,1,1", "--steps=2", f"--workdir={wd}"]) == 2
    assert "mesh_8x1x1 exists" in capsys.readouterr().err


def test_disagreeing_losses_and_failed_layouts_are_reported():
    ok = {"mesh": "8x1x1", "train_loss": 2.0, "train_step_secs": 1.0, "peak_memory_bytes": 2**30}
    off = dict(ok, mesh="2x2x2", train_loss=2.01)
    rows, agree = table([ok, off, {"mesh": "1x1x8", "error": "error: mesh: parameter ... not divisible"}])
    assert not agree and rows[1][-1] == "+1.00e-02" and rows[2][-1].startswith("error:")
    _, agree = table([ok, dict(ok, mesh="2x2x2", train_loss=2.0 + 1e-6)])
    assert agree


def test_mesh_list_errors():
    assert parse_meshes("8,1,1  2,2,2") == [(8, 1, 1), (2, 2, 2)]
    for bad in ("8,1", "a,b,c", "0,1,8", ""):
        with pytest.raises(UserError, match="--meshes"):
            parse_meshes(bad)
