"""Layers shared by the architectures, and the model side of the extension point.

Hook points: a PEFT method or an input transform changes what a model computes by intercepting
one of these methods with a Flax method interceptor (see `sftjax.peft.adapted`), never by editing
a model file:

- `Dense.__call__(x)`: every linear layer. LoRA/DoRA add their update here, QLoRA replaces the
  matmul with a dequantising one. The interceptor reads its own leaves (`lora_a`, `kernel_nf4`,
  ...) from the module's params, so the param tree alone decides which layers are affected.
- `Embed.__call__(ids)`: the input embeddings (NEFTune noise, FGM's perturbation, prompt tuning's
  virtual tokens).
- `Attention.memory(k, v, mask)` (in the architectures): extra keys/values every query may attend
  to, in front of the sequence's own (prefix and prompt tuning). The base model adds none.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sftjax.errors import UserError

NEG_INF = -1e30
# The checkpoint name of a Dense output a transform rewrote (e.g. W x + s B A x): the remat
# policies that save matmul outputs save this sum instead of its two matmul outputs.
ADAPTED = "adapted_dense"


def pin(layout: Any, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's layout by logical axes: `layout.pin(x, axes)` (the caller's mapping onto
    a mesh, e.g. `parallel.mesh.ActivationLayout`), or `x` itself when the model runs without one."""
    return x if layout is None else layout.pin(x, axes)


@functools.cache
def _cpu_has_bf16() -> bool:
    """Whether this host's CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); Linux flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True  # unknown (macOS, ...): trust XLA's bf16 kernels
    return "avx512_bf16" in flags or "amx_bf16" in flags


def matmul_dtype(dtype: Any) -> Any:
    """The dtype matmul inputs are multiplied in: `dtype`, except bfloat16 on a CPU without bf16
    instructions, where XLA's bf16 matmul runs at about half the float32 rate: there the bf16
    inputs are widened to float32 (exactly) and multiplied as float32; products and float32
    accumulation are the same numbers, activations stay bfloat16 between matmuls."""
    if jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu" and not _cpu_has_bf16():
        return jnp.float32
    return dtype


def dot(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """x @ w in `dtype` with float32 accumulation (fast bf16 path on CPU and GPU)."""
    m = matmul_dtype(dtype)
    rows = x.reshape(-1, x.shape[-1]) if w.ndim == 2 else x
    out = jnp.matmul(rows.astype(dtype).astype(m), w.astype(dtype).astype(m), preferred_element_type=jnp.float32)
    return out.reshape(*x.shape[:-1], w.shape[-1]).astype(dtype)


class Dense(nn.Module):
    """Linear layer with HF-transposed kernel [in, out], float32 master weights. A hook point."""

    features: int
    axes: tuple[str, str]
    use_bias: bool
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes)
        kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.float32)
        y = dot(x, kernel, self.dtype)
        if self.use_bias:
            binit = nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:])
            y = y + self.param("bias", binit, (self.features,), jnp.float32).astype(self.dtype)
        return y


class Embed(nn.Module):
    """Token embeddings [vocab, embed]; `attend` is the tied output head. A hook point."""

    num_embeddings: int
    features: int

    def setup(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        self.embedding = self.param("embedding", init, (self.num_embeddings, self.features), jnp.float32)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0)

    def attend(self, x: jax.Array, dtype: Any) -> jax.Array:
        return dot(x, self.embedding.T, dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * x32.astype(self.dtype)).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None) -> jax.Array:
    """Inverse frequencies of rotary embeddings, with HF's `linear` and `llama3` scalings."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    sc = dict(scaling or ())
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, old = sc["factor"], sc["original_max_position_embeddings"]
        lo, hi = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return jnp.where(medium, smoothed, scaled)
    raise UserError(f"model config: rope_scaling type {kind!r} is not supported (use linear or llama3)")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate [B, T, H, D] by positions [B, T] in HF's half-split (rotate_half) layout."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


def attention_mask(valid: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, T, T] boolean: causal, keys must be real tokens, and queries see only their segment."""
    t = valid.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :].astype(bool)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def cache_mask(valid: jax.Array, t: int, cache_index) -> jax.Array:
    """[B, T, S] boolean for T new tokens written at `cache_index` into S cache slots."""
    slots = jnp.arange(valid.shape[1])
    return (slots[None, :] <= cache_index + jnp.arange(t)[:, None])[None] & valid[:, None, :].astype(bool)


def grouped_attention(q, k, v, mask, dtype) -> jax.Array:
    """Softmax attention of q [B, T, H, D] over k, v [B, S, KV, D] (H a multiple of KV) -> [B, T, H*D].

    The G query heads sharing a key/value head are folded into the query axis ([B, KV, G*T, D]),
    so each product, forward and backward, is a batched matmul with one contracting axis: with
    [.., G, T, ..] kept apart, the key gradient contracts over two axes and XLA:CPU copies the
    score gradient into a transposed layout first."""
    b, t, nh, hd = q.shape
    s, nkv = k.shape[1], k.shape[2]
    g = nh // nkv
    m = matmul_dtype(dtype)
    q = q.reshape(b, t, nkv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, nkv, g * t, hd)
    scores = jnp.einsum("bkqd,bskd->bkqs", q.astype(m), k.astype(m), preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores.reshape(b, nkv, g, t, s) / math.sqrt(hd), NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(b, nkv, g * t, s)
    out = jnp.einsum("bkqs,bskd->bkqd", probs.astype(m), v.astype(dtype).astype(m), preferred_element_type=jnp.float32)
    return out.astype(dtype).reshape(b, nkv, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, nh * hd)


def causal_blocks(t: int) -> int:
    """Query blocks for `causal_attention` at length t: 8 from 1024 tokens, 4 from 512, 2 from 256,
    else 1 (8 blocks at 2x1024, LoRA q,v: 8.1 -> 7.8 s per step; 16 blocks: 8.2-8.4 s)."""
    for n in (8, 4, 2):
        if t >= 128 * n and t % n == 0:
            return n
    return 1


def causal_attention(q, k, v, mask, dtype) -> jax.Array:
    """`grouped_attention` for a causal mask over the last T of the S keys (the first S - T are
    memory every query may see, e.g. a prefix): query block i attends only to the keys up to its
    own end, so the upper-right blocks, masked out entirely, are never computed (4 blocks: 62.5%
    of the score FLOPs and memory). Equal to `grouped_attention` at every query with at least one
    visible key; a query that sees none (never a target) averages fewer masked-out values."""
    b, t = q.shape[:2]
    n = causal_blocks(t)
    if n == 1:
        return grouped_attention(q, k, v, mask, dtype)
    size, memory = t // n, k.shape[1] - t
    outs = []
    for i in range(n):
        rows, keys = slice(i * size, (i + 1) * size), memory + (i + 1) * size
        outs.append(grouped_attention(q[:, rows], k[:, :keys], v[:, :keys], mask[:, rows, :keys], dtype))
    return jnp.concatenate(outs, axis=1)
