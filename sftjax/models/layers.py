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
from jax.ad_checkpoint import checkpoint_name

from sftjax.errors import UserError

NEG_INF = -1e30
# The checkpoint name of a Dense output a transform rewrote (e.g. W x + s B A x): the remat
# policies that save matmul outputs save this sum instead of its two matmul outputs.
ADAPTED = "adapted_dense"
# The checkpoint name of attention's log-normaliser, all its backward needs besides q, k, v, mask.
ATTENTION_LSE = "attention_lse"


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


def _fold_heads(x: jax.Array, nkv: int) -> jax.Array:
    """[B, T, H, D] -> [B, KV, G*T, D]: the G query heads sharing a key/value head folded into the
    query axis, so every attention product is a batched matmul with one contracting axis."""
    b, t, nh, hd = x.shape
    return x.reshape(b, t, nkv, nh // nkv, hd).transpose(0, 2, 3, 1, 4).reshape(b, nkv, nh // nkv * t, hd)


def _unfold_heads(x: jax.Array, nh: int) -> jax.Array:
    """[B, KV, G*T, D] -> [B, T, H*D], the inverse of `_fold_heads`."""
    b, nkv, gt, hd = x.shape
    g = nh // nkv
    return x.reshape(b, nkv, g, gt // g, hd).transpose(0, 3, 1, 2, 4).reshape(b, gt // g, nh * hd)


def _masked_scores(qf: jax.Array, kt: jax.Array, mask: jax.Array, m: Any) -> jax.Array:
    """Scores of folded, pre-scaled queries qf [B, KV, G*T, D] against kt [B, KV, S, D], plus
    NEG_INF where `mask` [B, T, S] is False: float32 [B, KV, G*T, S]. (An added bias: XLA:CPU
    fuses it with the product; a select came out as a pass of its own, 31-33 against 21-24 ms for
    one layer's forward and backward at 8x256.)"""
    b, nkv, gt, _ = qf.shape
    t, s = mask.shape[1:]
    scores = jnp.einsum("bkqd,bksd->bkqs", qf.astype(m), kt.astype(m), preferred_element_type=jnp.float32)
    bias = jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)
    return (scores.reshape(b, nkv, gt // t, t, s) + bias[:, None, None]).reshape(b, nkv, gt, s)


def _operands(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q / sqrt(D) scaled in float32 and folded [B, KV, G*T, D], k and v as [B, KV, S, D]): the
    layouts both the forward and the backward multiply in, rebuilt by each from q, k, v."""
    qf = _fold_heads((q.astype(jnp.float32) * (1 / math.sqrt(q.shape[-1]))).astype(q.dtype), k.shape[2])
    return qf, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _attention_fwd(q, k, v, mask, dtype):
    nh = q.shape[2]
    m = matmul_dtype(dtype)
    qf, kt, vt = _operands(q, k, v)
    scores = _masked_scores(qf, kt, mask, m)
    top = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - top)
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkqs,bksd->bkqd", p.astype(m), vt.astype(dtype).astype(m), preferred_element_type=jnp.float32)
    out = _unfold_heads(out / total, nh).astype(dtype)
    # The backward rebuilds the probabilities from the scores and this log-normaliser; named, so
    # the remat policies keep it ([B, KV, G*T, 1]) rather than redo the forward to get it back.
    lse = checkpoint_name(top + jnp.log(total), ATTENTION_LSE)
    return out, (q, k, v, mask, lse)


def _attention_bwd(dtype, res, d_out):
    """Softmax attention's backward from the saved log-normaliser: P = exp(scores - lse), then
    dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(P dP)), dQ = dS K, dK = dS^T Q."""
    q, k, v, mask, lse = res
    nh, hd = q.shape[2], q.shape[3]
    nkv = k.shape[2]
    m = matmul_dtype(dtype)
    scale = 1 / math.sqrt(hd)
    qf, kt, vt = _operands(q, k, v)
    p = jnp.exp(_masked_scores(qf, kt, mask, m) - lse)
    dof = _fold_heads(d_out.reshape(q.shape), nkv)
    # A query that sees no key got NEG_INF + score everywhere, and its lse lost log(S) to rounding,
    # so p is 1 there, not 1/S. Its output is the mean of the values, independent of the scores,
    # which get no gradient from it (as through a `where` in autodiff). Both corrections go on its
    # row of dO ([.., G*T, D]), not on the S-times larger p or dS (a select on dS split XLA's
    # fusion: 29 against 20 ms).
    seen = _fold_heads(jnp.broadcast_to(jnp.any(mask, axis=-1)[:, :, None, None], q.shape[:3] + (1,)), nkv)
    do_v = jnp.where(seen, dof, dof / k.shape[1]).astype(m)
    dof = jnp.where(seen, dof, 0.0).astype(m)

    def mm(spec, a, b):
        return jnp.einsum(spec, a.astype(m), b.astype(m), preferred_element_type=jnp.float32)

    dv = mm("bkqs,bkqd->bksd", p, do_v)
    dp = mm("bkqd,bksd->bkqs", dof, vt.astype(dtype))
    ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))
    dq = _unfold_heads(mm("bkqs,bksd->bkqd", ds, kt) * scale, nh).reshape(q.shape)
    dk = mm("bkqs,bkqd->bksd", ds, qf)  # qf carries the scale
    return dq.astype(q.dtype), dk.transpose(0, 2, 1, 3).astype(k.dtype), dv.transpose(0, 2, 1, 3).astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def grouped_attention(q, k, v, mask, dtype) -> jax.Array:
    """Softmax attention of q [B, T, H, D] over k, v [B, S, KV, D] (H a multiple of KV) -> [B, T, H*D].

    Probabilities are never stored: the backward recomputes them from the scores and the saved
    log-normaliser (named ATTENTION_LSE for the remat policies), so under a policy that keeps it
    the forward's two batched products and softmax are not run again in the backward. Rows with
    no visible key (all of `mask` False) average the values uniformly, as a plain softmax would."""
    return _attention_fwd(q, k, v, mask, dtype)[0]


grouped_attention.defvjp(_attention_fwd, _attention_bwd)


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
