"""Blockwise-quantised frozen kernels for QLoRA: NF4 (4-bit NormalFloat) and int8, absmax scaled.

A frozen [.., in, out] kernel is flattened per layer into blocks of `BLOCK` = 64 values; each
block keeps its absmax (float32) and one code per value: NF4 (the 16 quantiles of a normal
distribution from the QLoRA paper, two codes packed per byte: [.., in, out/2] uint8) or int8
(round(127 * w / absmax): [.., in, out] int8).
In the tree the kernel leaf is replaced by `kernel_nf4` or `kernel_int8` plus `kernel_absmax`;
the `Quantized` transform dequantises them inside each `Dense`'s matmul, so the full-precision
kernel exists only transiently in the compiled step. LoRA adapters stay float32. Not done here:
QLoRA's double quantisation of the absmax values (it would save another ~0.37 bit per weight).

Quantisation happens per shard, while the base is placed: `quantize_tree` turns each kernel into
two lazy leaves (`io/lazy.py`) that read and quantise only the rows a device holds, layer by
layer, so no host ever holds a full float copy. Codes and absmax are sharded along the kernel's
input dimension (its mesh axes) and kept whole along the output dimension: blocks run along the
row-major flattened [in, out] kernel, so a shard of whole rows holds whole blocks whenever its
absmax slice is whole (the mesh's divisibility check on the absmax leaf guarantees it), and the
per-shard result is the global quantisation, bit for bit. Splitting the output dimension as
well would need a [.., in, out/64] absmax, which cuts blocks apart wherever out / shards is not a
multiple of 64 (SmolLM2's 576-wide q_proj on tensor=2: 4.5 blocks) and cannot hold a kernel
narrower than a block (a 32-wide k_proj). The cost: a kernel whose input axis is not split by
the mesh (o_proj, down_proj on an fsdp-only mesh with the default rules) keeps whole quantised
codes on every device, unless `mesh.rules` maps its input axis (heads, mlp) to fsdp too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.errors import UserError
from sftjax.io.lazy import Index, Lazy, as_lazy, key, normalise
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


def _check(shape) -> None:
    *_, fan_in, fan_out = shape
    if (fan_in * fan_out) % BLOCK or fan_out % 2:
        raise UserError(f"model.quantize: a kernel of shape {tuple(shape)} does not split into blocks of {BLOCK}")


def quantize(w: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """[.., in, out] float kernel -> {kernel_<kind>: codes, kernel_absmax: [.., in*out/64]}."""
    _check(w.shape)
    *lead, fan_in, fan_out = w.shape
    n = fan_in * fan_out
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


class _RowQuantiser:
    """Quantises row ranges of one lazy kernel for its two leaves (codes, absmax): each range is
    read and quantised once, kept until the other leaf has taken its part. A stacked kernel is
    read one layer at a time, so no more than one layer's float rows are in memory."""

    def __init__(self, kernel: Lazy, kind: str):
        self.kernel, self.kind, self.kept = kernel, kind, {}

    def parts(self, rows: list[Index]) -> list[dict[str, np.ndarray]]:
        todo = [r for r in rows if key(r) not in self.kept]
        fresh = dict(zip(map(key, todo), self._quantise(todo), strict=True))
        out = [fresh[key(r)] if key(r) in fresh else self.kept.pop(key(r)) for r in rows]
        self.kept.update(fresh)
        return out

    def _quantise(self, rows: list[Index]) -> list[dict[str, np.ndarray]]:
        if self.kernel.ndim == 2 or not rows:
            return [quantize(w, self.kind) for w in self.kernel.read_many(rows)]
        outs: list[dict[str, np.ndarray]] = [{} for _ in rows]
        for layer in range(self.kernel.shape[0]):
            wanted = [k for k, r in enumerate(rows) if r[0].start <= layer < r[0].stop]
            got = self.kernel.read_many([(slice(layer, layer + 1), *rows[k][1:]) for k in wanted]) if wanted else []
            for k, w in zip(wanted, got, strict=True):
                for leaf, q in quantize(w, self.kind).items():
                    if leaf not in outs[k]:
                        outs[k][leaf] = np.empty((rows[k][0].stop - rows[k][0].start, *q.shape[1:]), q.dtype)
                    outs[k][leaf][layer - rows[k][0].start] = q[0]
        return outs


class QuantizedLeaf(Lazy):
    """The codes or the absmax of a kernel quantised by rows (see the module docstring)."""

    def __init__(self, rq: _RowQuantiser, leaf: str):
        *lead, fan_in, fan_out = rq.kernel.shape
        self.rq, self.leaf, self.fan_out = rq, leaf, fan_out
        if leaf == "kernel_absmax":
            self.shape, self.dtype = (*lead, fan_in * fan_out // BLOCK), np.dtype(np.float32)
        elif rq.kind == "nf4":
            self.shape, self.dtype = (*lead, fan_in, fan_out // 2), np.dtype(np.uint8)
        else:
            self.shape, self.dtype = (*lead, fan_in, fan_out), np.dtype(np.int8)

    def _rows(self, index: Index) -> Index:
        """The kernel slice (whole rows) that quantises to this leaf's `index`."""
        *lead, last = normalise(index, self.shape)
        out = slice(0, self.fan_out)
        if self.leaf != "kernel_absmax":
            if (last.start, last.stop) != (0, self.shape[-1]):
                raise ValueError(f"{self.leaf}: the output dimension of quantised codes is never split, got {index}")
            return (*lead, out)
        start, stop = last.start * BLOCK, last.stop * BLOCK
        if start % self.fan_out or stop % self.fan_out:
            raise ValueError(f"kernel_absmax: slice {index} cuts rows of {self.fan_out} values apart")
        return (*lead, slice(start // self.fan_out, stop // self.fan_out), out)

    def read_many(self, indices):
        return [p[self.leaf if self.leaf == "kernel_absmax" else f"kernel_{self.rq.kind}"]
                for p in self.rq.parts([self._rows(i) for i in indices])]


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
    """Every frozen decoder-layer kernel of `frozen` as lazy quantised leaves (codes, absmax),
    quantised shard by shard when placed; other leaves are kept."""
    out = {}
    hits = 0
    for path, v in flatten(frozen).items():
        if LAYER_KERNEL.search(path):
            _check(v.shape)
            mod = path[: -len("/kernel")]
            rq = _RowQuantiser(as_lazy(v), kind)
            out |= {f"{mod}/{leaf}": QuantizedLeaf(rq, leaf) for leaf in (f"kernel_{kind}", "kernel_absmax")}
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
        """The kernel's layer axis (if any) and input axis; the output axis stays whole, so shards
        hold whole blocks (see the module docstring)."""
        mod, _, leaf = path.rpartition("/")
        if not leaf.startswith("kernel_"):
            return None
        *lead, fan_in, _ = base[f"{mod}/kernel"]
        return (*lead, fan_in) if leaf == "kernel_absmax" else (*lead, fan_in, None)
