"""Trainable share and memory (parameters + optimizer state) of each fine-tuning method on
SmolLM2-135M-Instruct (the embedded model), computed from the real parameter trees' shapes and
dtypes. No training runs: optimizer state comes from `jax.eval_shape(tx.init, trainable)`.

    PYTHONPATH=. python bench/peft_memory.py             # the tables
    PYTHONPATH=. python bench/peft_memory.py --compiled  # XLA's memory analysis of the gradient
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.build import build
from sftjax.config import base_config
from sftjax.params import count, flatten
from sftjax.peft import quant
from sftjax.train.optim import make_optimizer

MB = 1024**2


def _bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


N_BASE = 134_515_008  # SmolLM2-135M parameters (checked in main())


def measure(name: str, **over) -> dict:
    c = base_config()
    c.mesh.data = 1
    for key, v in over.items():
        sect, k = key.split("__")
        c[sect][k] = v
    s = build(c)
    n_train, n_all = count(s.trainable), N_BASE
    tx, _ = make_optimizer(c.optim, s.trainable, 100)
    opt = jax.eval_shape(tx.init, s.trainable)
    row = dict(method=name, trainable=n_train, pct=100 * n_train / n_all, frozen_mb=_bytes(s.frozen) / MB,
               trainable_mb=_bytes(s.trainable) / MB, opt_mb=_bytes(opt) / MB)
    row["total_mb"] = row["frozen_mb"] + row["trainable_mb"] + row["opt_mb"]
    return row


def main() -> None:
    rows = [
        measure("full fine-tuning", lora__enabled=False),
        measure("last 2 layers + head", lora__enabled=False, model__scan_layers=False, train__freeze="last_layers",
                train__last_layers=2),
        measure("head only (tied: embedding) + final norm", lora__enabled=False, train__freeze="head"),
        measure("LoRA r=8 q,v", lora__targets=("qv",)),
        measure("LoRA r=8 all linear", lora__targets=("all_linear",)),
        measure("DoRA r=8 all linear", lora__targets=("all_linear",), lora__dora=True),
        measure("QLoRA nf4 r=8 all linear", lora__targets=("all_linear",), model__quantize="nf4"),
        measure("QLoRA int8 r=8 all linear", lora__targets=("all_linear",), model__quantize="int8"),
        measure("prompt tuning, 16 tokens", lora__enabled=False, prompt_tuning__method="prompt"),
        measure("prefix tuning, 16 per layer", lora__enabled=False, prompt_tuning__method="prefix"),
    ]
    print("| method | trainable | % | frozen MiB | trainable MiB | AdamW state MiB | total MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['trainable']:,} | {r['pct']:.3f} | {r['frozen_mb']:.1f} | {r['trainable_mb']:.2f} "
              f"| {r['opt_mb']:.2f} | {r['total_mb']:.1f} |")

    # Base parameter storage by format, from the real shapes: layer kernels quantised, the rest float.
    c = base_config()
    c.mesh.data = 1
    c.lora.enabled = False
    base = jax.tree.map(np.asarray, build(c).merged_params())
    flat = flatten(base)
    kernels = {p: v for p, v in flat.items() if quant.LAYER_KERNEL.search(p)}
    rest = sum(v.size for p, v in flat.items() if p not in kernels)
    n_k = sum(v.size for v in kernels.values())
    assert n_k + rest == N_BASE, n_k + rest
    print(f"\nbase parameters: {n_k + rest:,} ({n_k:,} in decoder-layer kernels, {rest:,} other)")
    print("| base storage | bytes | MiB |")
    print("|---|---:|---:|")
    for kind in ("nf4", "int8"):
        qb = sum(quant.nbytes(quant.quantize(v, kind)) for v in kernels.values())
        for other, size in (("float32", 4), ("bfloat16", 2)):
            b = qb + rest * size
            print(f"| {kind} layer kernels + {other} rest | {b:,} | {b / MB:.1f} |")
    for name, size in (("float32", 4), ("bfloat16", 2)):
        b = (n_k + rest) * size
        print(f"| all {name} | {b:,} | {b / MB:.1f} |")


def compiled(batch: int = 4, length: int = 256) -> None:
    """Arguments and scratch bytes of the compiled gradient (forward + backward, no optimizer) as
    XLA plans them, for full fine-tuning and all-linear LoRA r=8 over a float32/NF4/int8 base."""
    from sftjax.train.step import token_stats

    ids = {"input_ids": jnp.zeros((batch, length), jnp.int32), "valid": jnp.ones((batch, length), bool),
           "labels": jnp.zeros((batch, length), jnp.int32), "weights": jnp.ones((batch, length), jnp.float32)}
    print(f"| gradient of a {batch}x{length} batch | arguments MiB | scratch MiB | sum MiB |")
    print("|---|---:|---:|---:|")
    for name, lora_on, q in (("full fine-tuning", False, "none"), ("LoRA, float32 base", True, "none"),
                             ("QLoRA nf4", True, "nf4"), ("QLoRA int8", True, "int8")):
        c = base_config()
        c.mesh.data, c.lora.enabled, c.lora.targets, c.model.quantize = 1, lora_on, ("all_linear",), q
        s = build(c)
        g = jax.jit(jax.grad(lambda tr, fr, b, s=s: token_stats(s.model, tr, fr, b)["loss_sum"]))
        m = g.lower(s.trainable, s.frozen, ids).compile().memory_analysis()
        a, t = m.argument_size_in_bytes / MB, m.temp_size_in_bytes / MB
        print(f"| {name} | {a:.1f} | {t:.1f} | {a + t:.1f} |")


if __name__ == "__main__":
    compiled() if "--compiled" in sys.argv else main()
