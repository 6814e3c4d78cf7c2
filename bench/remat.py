"""Time and memory of each `model.remat` policy on one training step.

SmolLM2-135M-Instruct (embedded GGUF, float32), random tokens, loss on every token, AdamW; each
policy in its own process (so peak RSS is its own), back to back:

    python bench/remat.py [--batch 8 --length 256 --steps 3 --method lora|full]

Prints one line per policy: s/step, the first step (compile included), XLA's temporary buffer
size for the compiled step (activations kept for the backward pass live there) and the process's
peak RSS, each also as a ratio to `none`. On CPU, device memory is host memory, and `offload`'s
"pinned host" memory is the same RAM, so it can only show its cost, not its saving.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload")


def run_one(a) -> dict:
    import jax
    import numpy as np

    from sftjax.build import build
    from sftjax.config import base_config
    from sftjax.parallel.mesh import place_batch
    from sftjax.train.step import init_state, make_train_step

    cfg = base_config()
    cfg.model.remat = a.policy
    cfg.lora.enabled = a.method == "lora"
    cfg.lora.targets = ("all_linear",)
    cfg.mesh.data = 1
    setup = build(cfg)
    state, tx, sched = init_state(setup, cfg.optim, cfg.train.steps)
    fn = make_train_step(setup.model, tx, sched, 1, False, 0, jax.tree.map(lambda x: x.sharding, state))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, setup.model_cfg.vocab_size, (a.batch, a.length + 1)).astype(np.int32)
    batch = place_batch({"input_ids": ids[:, :-1], "valid": np.ones((a.batch, a.length), bool),
                         "labels": ids[:, 1:], "weights": np.ones((a.batch, a.length), np.float32)}, setup.mesh)
    t = time.perf_counter()
    mem = fn.lower(state, setup.frozen, batch).compile().memory_analysis()
    state, m = fn(state, setup.frozen, batch)
    jax.block_until_ready(m)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(a.steps):
        state, m = fn(state, setup.frozen, batch)
    jax.block_until_ready(m)
    return {"step_s": (time.perf_counter() - t) / a.steps, "first_s": first, "loss": float(m["loss"]),
            "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else -1,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--policy", help=argparse.SUPPRESS)  # internal: run one policy in this process
    a = p.parse_args()
    if a.policy:
        print(json.dumps(run_one(a)))
        return
    rows = {}
    for pol in a.policies.split(","):
        cmd = [sys.executable, __file__, f"--batch={a.batch}", f"--length={a.length}", f"--steps={a.steps}",
               f"--method={a.method}", f"--policy={pol}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(f"{pol}: failed: {r.stderr.strip().splitlines()[-1]}")
            continue
        rows[pol] = json.loads(r.stdout.strip().splitlines()[-1])
    base = rows.get("none")
    print(f"# {a.method}, batch {a.batch}x{a.length}, float32, SmolLM2-135M; ratios against remat=none")
    print("| model.remat | s/step | first step s | XLA temp GiB | peak RSS GiB | loss |")
    print("|---|---|---|---|---|---|")
    for pol, r in rows.items():
        ratio = (lambda k, r=r: f" ({r[k] / base[k]:.2f}x)") if base else (lambda k, r=r: "")
        print(f"| {pol} | {r['step_s']:.2f}{ratio('step_s')} | {r['first_s']:.1f} | "
              f"{r['temp_bytes'] / 2**30:.2f}{ratio('temp_bytes')} | {r['peak_rss'] / 2**30:.2f}{ratio('peak_rss')} | "
              f"{r['loss']:.4f} |")


if __name__ == "__main__":
    main()
