"""Train-step throughput and peak memory: sftjax vs PyTorch + PEFT on the same model and shapes.

Both sides: SmolLM2-135M-Instruct (embedded GGUF, dequantised to float32), LoRA on the same
targets, AdamW, one optimizer step per batch of --batch x --length tokens, loss over all tokens.
Each side runs in its own subprocess (so peak RSS is its own), back to back on the same machine.

    python bench/train_step.py [--batch 8 --length 64 --steps 5 --targets attention --dtype float32]

Prints one line per measure with the ratio sftjax / torch (time: lower is better for sftjax).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PEFT_TARGETS = {"qv": ["q_proj", "v_proj"], "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def run_jax(a) -> dict:
    import jax
    import numpy as np

    from sftjax.build import build
    from sftjax.config import base_config
    from sftjax.parallel.mesh import place_batch
    from sftjax.train.step import init_state, make_train_step

    cfg = base_config()
    cfg.lora.targets = (a.targets,)
    cfg.model.dtype = a.dtype
    cfg.mesh.data = 1
    setup = build(cfg)
    state, tx, sched = init_state(setup, cfg.optim, cfg.train.steps)
    fn = make_train_step(setup.model, tx, sched, 1, False, 0, jax.tree.map(lambda x: x.sharding, state))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, (a.batch, a.length + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "valid": np.ones((a.batch, a.length), bool), "labels": ids[:, 1:],
             "weights": np.ones((a.batch, a.length), np.float32)}
    b = place_batch(batch, setup.mesh)
    t = time.perf_counter()
    state, m = fn(state, setup.frozen, b)
    jax.block_until_ready(m)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(a.steps):
        state, m = fn(state, setup.frozen, b)
    jax.block_until_ready(m)
    return {"step_s": (time.perf_counter() - t) / a.steps, "first_step_s": first}


def run_torch(a) -> dict:
    import os

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sftjax.io.load import embedded_model_path

    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32 if a.dtype == "float32" else torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS[a.targets]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (a.batch, a.length), generator=gen)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()

    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    return {"step_s": (time.perf_counter() - t) / a.steps, "first_step_s": first}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--targets", default="attention", choices=sorted(PEFT_TARGETS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--timeout", type=int, default=600, help="seconds allowed per side")
    p.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        out = run_jax(a) if a.side == "jax" else run_torch(a)
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return
    res = {}
    for side in ("jax", "torch"):
        try:
            r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side], capture_output=True,
                               text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            # e.g. torch's bfloat16 matmuls on CPUs without AMX take many minutes per step
            sys.exit(f"{side} side took longer than --timeout={a.timeout}s; no ratio")
        if r.returncode:
            sys.exit(f"{side} side failed:\n{r.stderr[-3000:]}")
        res[side] = json.loads(r.stdout.strip().splitlines()[-1])
    tokens = a.batch * a.length
    j, t = res["jax"], res["torch"]
    print(f"shape: batch {a.batch} x length {a.length}, LoRA targets {a.targets}, {a.dtype}")
    print(f"step time     sftjax {j['step_s']:.3f} s  torch {t['step_s']:.3f} s  ratio {j['step_s'] / t['step_s']:.2f}")
    print(f"tokens/s      sftjax {tokens / j['step_s']:.0f}  torch {tokens / t['step_s']:.0f}  "
          f"ratio {t['step_s'] / j['step_s']:.2f}")
    print(f"first step    sftjax {j['first_step_s']:.1f} s (compile)  torch {t['first_step_s']:.1f} s")
    print(f"peak RSS      sftjax {j['peak_rss_mib']:.0f} MiB  torch {t['peak_rss_mib']:.0f} MiB  "
          f"ratio {j['peak_rss_mib'] / t['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
