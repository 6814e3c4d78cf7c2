"""This machine's matmul peak on each side: a 2048 x 2048 by 2048 x 2048 product, float32, and
bfloat16 inputs with float32 accumulation (sftjax's `models.layers.dot`; torch's autocast
matmul). sftjax's MFU figures divide by its own float32 (or bf16) peak."""

from __future__ import annotations

import time

from bench.cases import Case, Measure

N = 2048


def jax_side(a) -> dict:
    from sftjax.parallel.flops import measured_cpu_peak

    return {"peak_f32_gflops": measured_cpu_peak("float32") / 1e9, "peak_bf16_gflops": measured_cpu_peak("bfloat16") / 1e9}


def torch_matmul_flops(dtype, n: int = N, repeats: int = 3) -> float:
    """Best of `repeats` n x n products (after one warm-up), in FLOP/s."""
    import torch

    x = torch.ones(n, n, dtype=dtype)
    x @ x
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x @ x
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def torch_side(a) -> dict:
    import torch

    out = {"peak_f32_gflops": torch_matmul_flops(torch.float32) / 1e9}
    # Without bf16 instructions (AVX2-only CPUs) torch's bf16 matmul is ~200x slower than float32;
    # a small probe first keeps a 2048 product from taking a minute.
    probe = torch_matmul_flops(torch.bfloat16, 256, 1)
    out["peak_bf16_gflops"] = (torch_matmul_flops(torch.bfloat16) if probe > 5e9 else probe) / 1e9
    return out


CASES = {"peak": Case("matmul peak, 2048^3 (bf16: bf16 inputs, float32 accumulation)", jax_side, torch_side,
                      (Measure("peak_f32_gflops", "float32 GFLOP/s", "rate"),
                       Measure("peak_bf16_gflops", "bf16 GFLOP/s", "rate")))}
