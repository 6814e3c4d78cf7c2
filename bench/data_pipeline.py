"""Data path throughput and packing efficiency on a real chat dataset, vs the train step's appetite.

    python bench/data_pipeline.py [--source recipe:chitchat --max-length 512 --batch 8 --step-steps 2]

Prints one figure per line:
  - preparation (read -> filter -> template -> tokenise + mask): examples/s
  - loader (grain: shuffle -> mix -> pack or bucket -> batch), examples/s, for packing, length
    buckets and one fixed length, each with its non-pad fraction (the packing efficiency)
  - the train step of SmolLM2-135M (LoRA, float32) at the same shape: examples/s it consumes,
    and the ratio loader / step (> 1: the data path keeps up).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="recipe:chitchat")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=200, help="loader batches timed per mode")
    p.add_argument("--step-steps", type=int, default=2, help="train steps timed (0: skip the model)")
    a = p.parse_args()

    import numpy as np

    from sftjax.config import base_config
    from sftjax.data import pipeline
    from sftjax.data.loader import make_loader
    from sftjax.io.load import load_tokenizer

    cfg = base_config()
    cfg.data.train, cfg.data.max_length, cfg.data.eval_fraction = a.source, a.max_length, 0.0
    tok = load_tokenizer(cfg.model.path)
    t = time.perf_counter()
    data = pipeline.load(cfg, tok)
    prep = time.perf_counter() - t
    n = len(data.train[0])
    print(f"source {a.source}: {data.report[a.source]}")
    print(f"preparation: {n} examples in {prep:.1f} s = {n / prep:.0f} examples/s")

    loader_rate = {}
    for mode, kw in (("packing", dict(packing=True)), ("buckets=3", dict(buckets=3)), ("fixed length", dict(buckets=1))):
        d = cfg.data
        d.packing, d.buckets = kw.get("packing", False), kw.get("buckets", 3)
        slots = None if d.packing else pipeline.head_slots(data.train, d.max_length)
        loader = make_loader(data.train, [1.0], d, a.batch, tok.pad_token_id, slots)
        next(loader)  # warm-up (the first packing round fills all bins)
        t = time.perf_counter()
        examples = real = total = 0
        for _ in range(a.batches):
            b = next(loader)
            real += int(b["valid"].sum())
            total += b["valid"].size
            examples += int((b["position_ids"] == 0).sum() - (~b["valid"]).any(1).sum()) if d.packing else len(b["valid"])
        dt = time.perf_counter() - t
        loader.close()
        loader_rate[mode] = examples / dt
        print(f"loader ({mode}): {examples / dt:.0f} examples/s, {a.batches / dt:.1f} batches/s of {a.batch}x{d.max_length}, "
              f"non-pad fraction {real / total:.4f}, {examples / a.batches:.1f} examples per batch")

    if a.step_steps:
        import jax

        from sftjax.build import build
        from sftjax.parallel.mesh import place_batch
        from sftjax.train.step import init_state, make_train_step

        cfg.mesh.data = 1
        cfg.data.packing = True
        setup = build(cfg)
        state, tx, sched = init_state(setup, cfg.optim, cfg.train.steps)
        fn = make_train_step(setup.model, tx, sched, 1, False, 0, jax.tree.map(lambda x: x.sharding, state))
        loader = make_loader(data.train, [1.0], cfg.data, a.batch, tok.pad_token_id, None)
        batches = [next(loader) for _ in range(a.step_steps + 1)]
        loader.close()
        state, m = fn(state, setup.frozen, place_batch(batches[0], setup.mesh))
        jax.block_until_ready(m)
        t = time.perf_counter()
        for b in batches[1:]:
            state, m = fn(state, setup.frozen, place_batch(b, setup.mesh))
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t) / a.step_steps
        per_batch = np.mean([int((b["position_ids"] == 0).sum() - (~b["valid"]).any(1).sum()) for b in batches[1:]])
        step_rate = per_batch / dt
        print(f"train step (SmolLM2-135M LoRA f32, packed {a.batch}x{a.max_length}): {dt:.2f} s/step = "
              f"{step_rate:.1f} examples/s")
        print(f"ratio loader (packing) / step consumption: {loader_rate['packing'] / step_rate:.0f}x")


if __name__ == "__main__":
    main()
