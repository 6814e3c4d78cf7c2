"""Lazy weights: a leaf that knows its shape and can read any slice of itself, and nothing more.

Loading a model used to read the whole state dict into host memory on every process before
placing it; for a model larger than one host that cannot work. A `Lazy` leaf instead reads only
the slices asked for (`read_many`), so `parallel/mesh.place` can ask each process for exactly
the slices its own devices hold. The sources (a safetensors tensor here, a GGUF tensor in
`io/gguf_file.py`, quantised kernels in `peft/quant.py`) and the few transforms loading needs
(`Transposed`: HF's [out, in] kernels to our [in, out]; `Stacked`: per-layer tensors on a leading
layer axis, where a slice of that axis reads only those layers) compose, so a leaf's slice is
read straight from the file, one tensor at a time.

An index is a tuple of `slice`s, one per dimension, as `jax.make_array_from_callback` passes them.
`np.asarray(leaf)` reads the whole leaf (for the few places that want it all: convert, tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from sftjax.errors import UserError

Index = tuple[slice, ...]


def normalise(index: Index | None, shape: Sequence[int]) -> Index:
    """`index` with explicit start/stop (step 1) for every dimension; None is the whole array."""
    index = () if index is None else tuple(index)
    index += (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"lazy read: index {index} has a step; only contiguous slices are read")
        out.append(slice(start, stop))
    return tuple(out)


def key(index: Index) -> tuple:
    """A hashable form of an index (slices are unhashable before Python 3.12)."""
    return tuple((s.start, s.stop) for s in index)


class Lazy:
    """Base class: a float32 (unless `dtype` says otherwise) array of `shape`, read by slices."""

    shape: tuple[int, ...]
    dtype: np.dtype = np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def read_many(self, indices: Sequence[Index]) -> list[np.ndarray]:
        """The arrays at `indices` (normalised or not), in order. One call for all the slices a
        process needs lets a source that must decode a whole tensor (GGUF) decode it once."""
        raise NotImplementedError

    def read(self, index: Index | None = None) -> np.ndarray:
        return self.read_many([normalise(index, self.shape)])[0]

    def __getitem__(self, i: int) -> Lazy:
        """Entry `i` of the leading axis (one layer of a stacked leaf: `models/layout.unstack`)."""
        return Layer(self, int(i))

    @property
    def T(self) -> Lazy:  # noqa: N802 (numpy's name)
        return Transposed(self)

    def __array__(self, dtype=None, copy=None):
        out = self.read()
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={np.dtype(self.dtype).name})"


class Array(Lazy):
    """An array already in memory (tests, or a tree that mixes both)."""

    def __init__(self, value: Any):
        self.value = np.asarray(value)
        self.shape, self.dtype = self.value.shape, self.value.dtype

    def read_many(self, indices):
        return [self.value[normalise(i, self.shape)] for i in indices]

    def __getitem__(self, i: int) -> Lazy:
        return Array(self.value[i])


class Transposed(Lazy):
    """A 2-D leaf with its axes swapped: a slice of the result is the swapped slice of the source."""

    def __init__(self, src: Lazy):
        if src.ndim != 2:
            raise ValueError(f"Transposed: needs a 2-D leaf, got shape {src.shape}")
        self.src, self.shape, self.dtype = src, src.shape[::-1], src.dtype

    def read_many(self, indices):
        swapped = [normalise(i, self.shape)[::-1] for i in indices]
        return [x.T for x in self.src.read_many(swapped)]


class Layer(Lazy):
    """Entry `i` of a leaf's leading axis."""

    def __init__(self, src: Lazy, i: int):
        self.src, self.i, self.shape, self.dtype = src, i, src.shape[1:], src.dtype

    def read_many(self, indices):
        rows = [(slice(self.i, self.i + 1), *normalise(x, self.shape)) for x in indices]
        return [x[0] for x in self.src.read_many(rows)]


class Stacked(Lazy):
    """Equal-shaped leaves stacked on a new leading (layer) axis.

    Reads go layer by layer: all the slices wanted from layer 0, then from layer 1, ..., so a
    source is read (or decoded) once per layer, and a slice of the layer axis touches only the
    layers it covers."""

    def __init__(self, parts: Sequence[Lazy]):
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"Stacked: the parts have different shapes {sorted(shapes)}")
        self.parts = list(parts)
        self.shape, self.dtype = (len(parts), *shapes.pop()), parts[0].dtype

    def __getitem__(self, i: int) -> Lazy:
        return self.parts[i]

    def read_many(self, indices):
        indices = [normalise(i, self.shape) for i in indices]
        outs = [np.empty([s.stop - s.start for s in i], self.dtype) for i in indices]
        for layer, part in enumerate(self.parts):
            wanted = [k for k, i in enumerate(indices) if i[0].start <= layer < i[0].stop]
            if not wanted:
                continue
            for k, x in zip(wanted, part.read_many([indices[k][1:] for k in wanted]), strict=True):
                copy(outs[k][layer - indices[k][0].start], x)
        return outs


def copy(dst: np.ndarray, src: np.ndarray, rows: int = 512, cols: int = 64) -> None:
    """`dst[...] = src`; a transposed 2-D `src` (a `Transposed` read: every HF kernel) is copied in
    tiles of `rows` x `cols`, so both sides of each tile stay in cache: numpy's one strided copy
    of a whole transposed matrix was 2-3x slower (measured on a 4864 x 896 kernel)."""
    if src.ndim != 2 or src.flags.c_contiguous or not src.flags.f_contiguous:
        dst[...] = src
        return
    for i in range(0, src.shape[0], rows):
        for j in range(0, src.shape[1], cols):
            dst[i:i + rows, j:j + cols] = src[i:i + rows, j:j + cols]


class SafetensorsTensor(Lazy):
    """One tensor of a .safetensors file, read by slices (`safe_open(...).get_slice`), as float32.

    The file is opened for each `read_many` and closed after it: its memory map then never holds
    more than the tensor being read (mapped file pages count towards a process's resident memory)."""

    def __init__(self, path: str, name: str, shape: Sequence[int]):
        self.path, self.name, self.shape = path, name, tuple(int(d) for d in shape)

    def read_many(self, indices):
        from safetensors import safe_open

        with safe_open(self.path, framework="numpy") as f:
            t = f.get_slice(self.name)
            return [np.asarray(t[normalise(i, self.shape)], np.float32) for i in indices]


def safetensors_file(path: str) -> dict[str, SafetensorsTensor]:
    """Every tensor of a .safetensors file as a lazy leaf (only the header is read).

    Opening checks the header against the file's size, so a truncated download or copy fails here,
    naming the file, instead of as a library error when a tensor is first read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {k: SafetensorsTensor(path, k, f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise UserError(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt: "
                        "copy or download it again") from None


def as_lazy(x: Any) -> Lazy:
    return x if isinstance(x, Lazy) else Array(x)


def materialise(tree: Any) -> Any:
    """Every lazy leaf of `tree` read whole into a numpy array (other leaves unchanged)."""
    return jax.tree.map(lambda x: x.read() if isinstance(x, Lazy) else x, tree)
