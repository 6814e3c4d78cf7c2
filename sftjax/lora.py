"""LoRA as a transform on the param tree.

`init_adapters` adds `lora_a` [.., in, r] and `lora_b` [.., r, out] beside each targeted `kernel`
(the stacked layer axis, if any, stays in front). B starts at zero, so the adapted model equals
the base model exactly at step 0. The model's `Linear` picks the adapters up from the tree; no
model code changes with the set of targets. `merge` folds them back into the kernels for export.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.errors import UserError
from sftjax.params import flatten, matching, unflatten

# Module-path presets; a target is a regex searched in the kernel's module path.
PRESETS = {
    "qv": [r"self_attn/(q|v)_proj$"],
    "attention": [r"self_attn/(q|k|v|o)_proj$"],
    "all_linear": [r"self_attn/(q|k|v|o)_proj$", r"mlp/(gate|up|down)_proj$"],
}


def scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def target_modules(params: Mapping, targets: list[str]) -> list[str]:
    """Module paths (kernel path minus '/kernel') selected by preset names or regexes."""
    pats: list[str] = []
    for t in targets:
        pats += PRESETS.get(t, [t])
    modules = [p[: -len("/kernel")] for p in flatten(params) if p.endswith("/kernel")]
    return sorted(matching(modules, pats, "lora.targets"))


def init_adapters(params: Mapping, targets: list[str], rank: int, seed: int) -> dict:
    """Adapters for the targeted kernels: A ~ U(+-1/sqrt(in)) (PEFT's default), B = 0."""
    if rank <= 0:
        raise UserError(f"lora.rank: must be a positive integer, got {rank}")
    flat = flatten(params)
    out = {}
    rng = np.random.default_rng(seed)
    for mod in target_modules(params, targets):
        kernel = flat[f"{mod}/kernel"]
        *lead, fan_in, fan_out = kernel.shape
        bound = 1.0 / math.sqrt(fan_in)
        out[f"{mod}/lora_a"] = rng.uniform(-bound, bound, (*lead, fan_in, rank)).astype(np.float32)
        out[f"{mod}/lora_b"] = np.zeros((*lead, rank, fan_out), np.float32)
    return unflatten(out)


def merge(params: Mapping, lora_scale: float) -> dict:
    """Fold every (lora_a, lora_b) pair into its kernel: W + scale * A @ B; drops the adapters."""
    flat = flatten(params)
    out = {p: v for p, v in flat.items() if not p.endswith(("/lora_a", "/lora_b"))}
    for p in flat:
        if p.endswith("/lora_a"):
            mod = p[: -len("/lora_a")]
            delta = jnp.matmul(flat[p], flat[f"{mod}/lora_b"], precision=jax.lax.Precision.HIGHEST)
            out[f"{mod}/kernel"] = flat[f"{mod}/kernel"] + lora_scale * delta
    return unflatten(out)


def adapter_axes(kernel_axes: tuple) -> tuple[tuple, tuple]:
    """Logical axes of A and B from their kernel's axes: the rank dimension is never sharded."""
    *lead, fan_in, fan_out = kernel_axes
    return (*lead, fan_in, None), (*lead, None, fan_out)
