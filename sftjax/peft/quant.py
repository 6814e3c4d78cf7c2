"""Blockwise-quantised frozen kernels for QLoRA: NF4 (4-bit NormalFloat) and int8, absmax scaled.

A frozen [.., in, out] kernel is flattened per layer into blocks of `BLOCK` = 64 values; each
block keeps its absmax (float32) and one code per value: NF4 (the 16 quantiles of a normal
distribution from the QLoRA paper, two codes packed per byte: [.., in, out/2] uint8) or int8
(round(127 * w / absmax): [.., in, out] int8).
In the tree the kernel leaf is replaced by `kernel_nf4` or `kernel_int8` plus `kernel_absmax`;
the `Quantized` transform dequantises them inside each `Dense`'s matmul, so the full-precision
kernel exists only transiently in the compiled step. LoRA adapters stay float32. Not done here:
QLoRA's double quantisation of the absmax values (it would save another ~0.37 bit per weight).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.errors import UserError
from sftjax.models.layers import Dense, dot
from sftjax.models.layout import LAYER
from sftjax.params import flatten, unflatten
from sftjax.peft.adapted import Transform, hook

BLOCK = 64
# bitsandbytes' NF4 code book (QLoRA, appendix E).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
KINDS = ("nf4", "int8")
# Frozen decoder-layer kernels (stacked or unrolled); embeddings and the head stay as they are.
LAYER_KERNEL = re.compile(LAYER + r".*/kernel$")


def quantize(w: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """[.., in, out] float kernel -> {kernel_<kind>: codes, kernel_absmax: [.., in*out/64]}."""
    *lead, fan_in, fan_out = w.shape
    n = fan_in * fan_out
    if n % BLOCK or fan_out % 2:
        raise UserError(f"model.quantize: a kernel of shape {w.shape} does not split into blocks of {BLOCK}")
    blocks = np.asarray(w, np.float32).reshape(*lead, n // BLOCK, BLOCK)
    absmax = np.abs(blocks).max(-1)
    scaled = blocks / np.where(absmax == 0, 1.0, absmax)[..., None]
    if kind == "int8":
        codes = np.rint(scaled * 127).astype(np.int8).reshape(*lead, fan_in, fan_out)
    else:  # nf4
        mid = (NF4[1:] + NF4[:-1]) / 2  # nearest code = count of midpoints below the value
        idx = np.searchsorted(mid, scaled).astype(np.uint8).reshape(*lead, fan_in, fan_out // 2, 2)
        codes = (idx[..., 0] << 4) | idx[..., 1]
    return {f"kernel_{kind}": codes, "kernel_absmax": absmax.astype(np.float32)}


def dequantize(codes, absmax, kind: str):
    """Codes [.., in, out or out/2] and absmax [.., in*out/64] -> float32 [.., in, out]; traceable."""
    if kind == "nf4":
        codes = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(*codes.shape[:-1], -1)
        vals = jnp.asarray(NF4)[codes.astype(jnp.int32)]
    else:
        vals = codes.astype(jnp.float32) / 127
    blocks = vals.reshape(*absmax.shape, BLOCK) * absmax[..., None]
    return blocks.reshape(vals.shape)


def quantize_tree(frozen: Mapping, kind: str) -> dict:
    """Quantise every frozen decoder-layer kernel of `frozen`; other leaves are kept."""
    out = {}
    hits = 0
    for path, v in flatten(frozen).items():
        if LAYER_KERNEL.search(path):
            mod = path[: -len("/kernel")]
            out |= {f"{mod}/{k}": q for k, q in quantize(np.asarray(v), kind).items()}
            hits += 1
        else:
            out[path] = v
    if not hits:
        raise UserError(f"model.quantize={kind}: no frozen decoder-layer kernel to quantise; QLoRA needs a frozen "
                        "base (lora.enabled=True, or a train.freeze that freezes layers)")
    return unflatten(out)


def dequantize_tree(params: Mapping) -> dict:
    """Inverse of `quantize_tree` up to the quantisation error (for export and merging)."""
    flat = flatten(params)
    out = {}
    for path, v in flat.items():
        mod, _, leaf = path.rpartition("/")
        kind = leaf.removeprefix("kernel_")
        if kind in KINDS:
            out[f"{mod}/kernel"] = np.asarray(dequantize(jnp.asarray(v), jnp.asarray(flat[f"{mod}/kernel_absmax"]), kind))
        elif leaf != "kernel_absmax":
            out[path] = v
    return unflatten(out)


def nbytes(tree: Mapping) -> int:
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in flatten(tree).values())


def _kind(module) -> str | None:
    return next((k for k in KINDS if module.has_variable("params", f"kernel_{k}")), None)


def kernel(module) -> jax.Array:
    """A `Dense` module's kernel as the model sees it: dequantised if it is stored quantised."""
    kind = _kind(module)
    if kind is None:
        return module.get_variable("params", "kernel")
    return dequantize(module.get_variable("params", f"kernel_{kind}"), module.get_variable("params", "kernel_absmax"),
                      kind)


class Quantized(Transform):
    """A `Dense` whose params hold a quantised kernel computes with it, dequantised in the matmul."""

    def intercept(self, next_fun, args, kwargs, context):
        mod = context.module
        kind = _kind(mod) if hook(context, Dense) else None
        if kind is None:
            return next_fun(*args, **kwargs)
        codes, absmax = mod.get_variable("params", f"kernel_{kind}"), mod.get_variable("params", "kernel_absmax")
        # Rematerialised: the backward pass dequantises again instead of keeping every layer's
        # full-precision kernel alive from the forward pass (which would undo the saving).
        qdot = jax.checkpoint(lambda c, s, x: dot(x, dequantize(c, s, kind), mod.dtype))
        y = qdot(codes, absmax, args[0])
        if mod.use_bias:
            y = y + mod.get_variable("params", "bias").astype(mod.dtype)
        return y

    def fold(self, params: Mapping) -> dict:
        return dequantize_tree(params)

    def axes(self, path: str, ndim: int, base: Mapping[str, tuple]) -> tuple | None:
        """Codes and absmax keep the kernel's layer axis (if any); the rest is unsharded."""
        mod, _, leaf = path.rpartition("/")
        if not leaf.startswith("kernel_"):
            return None
        lead = tuple(base[f"{mod}/kernel"][:-2])
        return (*lead, None) if leaf == "kernel_absmax" else (*lead, None, None)
