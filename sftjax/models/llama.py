"""Llama-family decoder (Llama, SmolLM, Qwen2, Mistral) as a pure-functional Flax linen module.

Parameters live in a plain nested dict; every parameter carries logical axis names (embed, mlp,
heads, kv, vocab, layers) so `sharding.py` can map them onto any mesh. Layers are stacked with
`nn.scan` (one compiled block, leading `layers` axis on every block weight), which keeps compile
time flat in depth.

LoRA lives in the tree, not in the code path: a `Linear` whose param dict also holds `lora_a` /
`lora_b` (added by `sftjax.peft.lora`) adds the low-rank update; without them it is a plain matmul.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sftjax.peft import quant
from sftjax.errors import UserError

_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters, named as in transformers' LlamaConfig where they exist."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # (key, value) pairs of the HF `rope_scaling` dict; a tuple keeps the config hashable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the model computes, as opposed to what it is: dtype, remat, layer stacking, LoRA.

    `scan_layers=False` unrolls the decoder into `layers_0 .. layers_{L-1}` subtrees (same math,
    longer compile): then per-layer rules such as "train only the last N layers" are plain path
    regexes. `neftune_alpha` > 0 adds NEFTune noise to the token embeddings when not
    deterministic (training; it needs a "dropout" rng). The LoRA scale is alpha / r (or alpha / sqrt(r) with rsLoRA) with r read off each
    adapter's shape, so per-target ranks need no extra plumbing.
    """

    dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = True
    lora_alpha: float = 1.0
    lora_rslora: bool = False
    lora_dropout: float = 0.0
    neftune_alpha: float = 0.0  # NEFTune: uniform noise on the input embeddings in training only


def _dot(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """x @ w in `dtype` with float32 accumulation (fast bf16 path on CPU and GPU)."""
    out = jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)


class Linear(nn.Module):
    """Dense layer with HF-transposed kernel [in, out] and an optional LoRA / DoRA update from the tree.

    DoRA (a `lora_magnitude` [out] leaf beside the adapters) rescales each output column of the
    adapted weight W + s*A@B to the learned magnitude m; the column norm is a constant in the
    backward pass, as in the DoRA paper (section 4.3) and PEFT. With `kernel_nf4` / `kernel_int8`
    and `kernel_absmax` in place of `kernel` (see `sftjax.peft.quant`) the kernel is dequantised here.
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool
    rt: Runtime
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.rt.dtype)
        quantized = [k for k in quant.KINDS if self.has_variable("params", f"kernel_{k}")]
        if quantized:  # QLoRA: a frozen blockwise-quantised kernel, dequantised right here
            kind = quantized[0]
            codes, absmax = self.get_variable("params", f"kernel_{kind}"), self.get_variable("params", "kernel_absmax")
            kernel = quant.dequantize(codes, absmax, kind)
            # Rematerialised: the backward pass dequantises again instead of keeping every layer's
            # full-precision kernel alive from the forward pass (which would undo the saving).
            qdot = jax.checkpoint(lambda c, s, inp: _dot(inp, quant.dequantize(c, s, kind), dtype))
            matmul = lambda inp: qdot(codes, absmax, inp)  # noqa: E731
        else:
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes)
            kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.float32)
            matmul = lambda inp: _dot(inp, kernel, dtype)  # noqa: E731
        y = matmul(x)
        if self.has_variable("params", "lora_a"):
            h = x
            if self.rt.lora_dropout > 0 and not self.deterministic:
                h = nn.Dropout(self.rt.lora_dropout)(h, deterministic=False)
            a = self.get_variable("params", "lora_a")
            b = self.get_variable("params", "lora_b")
            rank = a.shape[-1]
            s = self.rt.lora_alpha / (math.sqrt(rank) if self.rt.lora_rslora else rank)
            delta = _dot(_dot(h, a, dtype), b, dtype) * s
            if self.has_variable("params", "lora_magnitude"):
                m = self.get_variable("params", "lora_magnitude")
                w = kernel.astype(jnp.float32) + s * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
                norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(w * w, axis=0)))
                ratio = (m / norm).astype(dtype)
                # PEFT's form (bias left out of the rescaling); with dropout the base term sees it too.
                base = y if h is x else matmul(h)
                y = y + (ratio - 1) * base + ratio * delta
            else:
                y = y + delta
        if self.use_bias:
            binit = nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:])
            y = y + self.param("bias", binit, (self.features,), jnp.float32).astype(dtype)
        return y


class RMSNorm(nn.Module):
    eps: float
    rt: Runtime

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * x32.astype(self.rt.dtype)).astype(self.rt.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
    """Inverse frequencies of rotary embeddings, with HF's `linear` and `llama3` scalings."""
    hd = cfg.dim_per_head
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if not cfg.rope_scaling:
        return inv
    sc = dict(cfg.rope_scaling)
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


class Attention(nn.Module):
    cfg: LlamaConfig
    rt: Runtime
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache=None, cache_index=None):
        """Returns (output, updated cache); with a cache, k/v of `x` are written at `cache_index`
        and attention runs over all cache slots (mask [B, T, S])."""
        cfg, rt = self.cfg, self.rt
        b, t, _ = x.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
        lin = dict(rt=rt, deterministic=self.deterministic)
        q = Linear(nh * hd, ("embed", "heads"), cfg.attention_bias, name="q_proj", **lin)(x)
        k = Linear(nkv * hd, ("embed", "kv"), cfg.attention_bias, name="k_proj", **lin)(x)
        v = Linear(nkv * hd, ("embed", "kv"), cfg.attention_bias, name="v_proj", **lin)(x)
        inv_freq = rope_inv_freq(cfg)
        q = apply_rope(q.reshape(b, t, nh, hd), positions, inv_freq)
        k = apply_rope(k.reshape(b, t, nkv, hd), positions, inv_freq)
        v = v.reshape(b, t, nkv, hd)
        if cache is not None:
            at = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)
            cache = {**cache, "k": k, "v": v}
        pk = pv = None
        if self.has_variable("params", "prefix_k"):  # prefix tuning: learned keys/values every query sees
            pk, pv = self.get_variable("params", "prefix_k"), self.get_variable("params", "prefix_v")
            pk, pv = jnp.broadcast_to(pk, (b, *pk.shape)), jnp.broadcast_to(pv, (b, *pv.shape))
        elif cache is not None and "prompt_k" in cache:  # prompt tuning while decoding: the virtual tokens' k/v
            pk, pv = cache["prompt_k"], cache["prompt_v"]
        if pk is not None:
            k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
            v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
            mask = jnp.concatenate([jnp.ones((*mask.shape[:2], pk.shape[1]), bool), mask], axis=-1)
        q = q.reshape(b, t, nkv, nh // nkv, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(hd)
        scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(rt.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(rt.dtype)).reshape(b, t, nh * hd)
        return Linear(cfg.hidden_size, ("heads", "embed"), False, name="o_proj", **lin)(out), cache


class MLP(nn.Module):
    cfg: LlamaConfig
    rt: Runtime
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lin = dict(rt=self.rt, deterministic=self.deterministic)
        inter, hidden = self.cfg.intermediate_size, self.cfg.hidden_size
        gate = Linear(inter, ("embed", "mlp"), False, name="gate_proj", **lin)(x)
        up = Linear(inter, ("embed", "mlp"), False, name="up_proj", **lin)(x)
        return Linear(hidden, ("mlp", "embed"), False, name="down_proj", **lin)(nn.silu(gate) * up)


class Block(nn.Module):
    cfg: LlamaConfig
    rt: Runtime
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, mask, cache, cache_index):
        cfg, rt = self.cfg, self.rt
        kw = dict(cfg=cfg, rt=rt, deterministic=self.deterministic)
        h = RMSNorm(cfg.rms_norm_eps, rt, name="input_layernorm")(x)
        a, cache = Attention(name="self_attn", **kw)(h, positions, mask, cache, cache_index)
        x = x + a
        h = RMSNorm(cfg.rms_norm_eps, rt, name="post_attention_layernorm")(x)
        return x + MLP(name="mlp", **kw)(h), cache


def attention_mask(valid: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, T, T] boolean: causal, keys must be real tokens, and queries see only their segment."""
    t = valid.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :].astype(bool)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


class Llama(nn.Module):
    """Decoder-only LM. Returns float32 logits [B, T, vocab].

    With `head_positions` [B, K] the vocabulary head runs only at those positions and the logits
    are [B, K, vocab]: when few tokens are targets (short replies to long prompts) this skips most
    of the head's cost, which for small models is a large share of the whole step.

    With a `cache` (from `init_cache`) the call is one decoding step: `input_ids` occupy cache
    slots `cache_index ..`, `valid` [B, S] marks which of the S slots hold real tokens (prompt
    padding does not), `positions` must be given, and the result is (logits, updated cache).
    """

    cfg: LlamaConfig
    rt: Runtime = Runtime()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        valid: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        head_positions: jax.Array | None = None,
        cache: dict | None = None,
        cache_index: jax.Array | None = None,
    ):
        cfg, rt = self.cfg, self.rt
        b, t = input_ids.shape
        if valid is None:
            valid = jnp.ones((b, t), bool)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        if cache is None:
            mask = attention_mask(valid, segment_ids)
        else:
            slots = jnp.arange(valid.shape[1])
            mask = (slots[None, :] <= cache_index + jnp.arange(t)[:, None])[None] & valid[:, None, :].astype(bool)
        einit = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=einit, name="embed_tokens")
        x = embed(input_ids).astype(rt.dtype)
        if rt.neftune_alpha > 0 and not deterministic:
            x = x + neftune_noise(self.make_rng("dropout"), x.shape, rt.neftune_alpha).astype(rt.dtype)
        if self.has_variable("params", "embed_delta"):  # an adversarial perturbation (FGM, see sftjax.train.regularisers)
            x = x + self.get_variable("params", "embed_delta").astype(rt.dtype)
        block = nn.remat(Block, static_argnums=()) if rt.remat else Block
        if rt.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            run_layers = stack(cfg, rt, deterministic, name="layers")
        else:
            blocks = [block(cfg, rt, deterministic, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]

            def run_layers(x, positions, mask, cache, cache_index):
                caches = []
                for i, blk in enumerate(blocks):
                    layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
                    x, layer_cache = blk(x, positions, mask, layer_cache, cache_index)
                    caches.append(layer_cache)
                # The cache stays stacked over layers, as `init_cache` makes it.
                return x, None if cache is None else jax.tree.map(lambda *cs: jnp.stack(cs), *caches)

        n_prompt = 0
        if self.has_variable("params", "prompt_embedding"):  # prompt tuning: learned virtual tokens in front
            prompt = self.get_variable("params", "prompt_embedding")
            n_prompt = prompt.shape[0]
            virtual = jnp.broadcast_to(prompt, (b, *prompt.shape)).astype(rt.dtype)
            prompt_pos = jnp.broadcast_to(jnp.arange(n_prompt), (b, n_prompt))
            causal = jnp.broadcast_to(jnp.tril(jnp.ones((n_prompt, n_prompt), bool)), (b, n_prompt, n_prompt))
            positions = positions + n_prompt
            if cache is None:
                x = jnp.concatenate([virtual, x], axis=1)
                positions = jnp.concatenate([prompt_pos, positions], 1)
                top = jnp.concatenate([causal, jnp.zeros((b, n_prompt, t), bool)], axis=2)
                bottom = jnp.concatenate([jnp.ones((b, t, n_prompt), bool), mask], axis=2)
                mask = jnp.concatenate([top, bottom], axis=1)
                head_positions = None if head_positions is None else head_positions + n_prompt
            elif "prompt_k" not in cache:
                # Decoding: the virtual tokens see only each other, so their keys/values are computed
                # once (on the first call) and kept in the cache, where attention reads them as a prefix.
                kv = jnp.zeros((cfg.num_hidden_layers, b, n_prompt, *cache["k"].shape[3:]), cache["k"].dtype)
                _, filled = run_layers(virtual, prompt_pos, causal, {"k": kv, "v": kv}, 0)
                cache = {**cache, "prompt_k": filled["k"], "prompt_v": filled["v"]}
        x, cache = run_layers(x, positions, mask, cache, cache_index)
        n_drop = n_prompt if cache is None else 0  # with a cache the virtual tokens were never part of x
        if head_positions is not None:
            x = jnp.take_along_axis(x, head_positions[..., None], axis=1)
        elif n_drop:
            x = x[:, n_drop:]  # logits for the real tokens only
        x = RMSNorm(cfg.rms_norm_eps, rt, name="norm")(x)
        if cfg.tie_word_embeddings:
            logits = _dot(x, embed.embedding.T, rt.dtype).astype(jnp.float32)
        else:
            logits = Linear(cfg.vocab_size, ("embed", "vocab"), False, rt, name="lm_head")(x).astype(jnp.float32)
        return logits if cache is None else (logits, cache)


def neftune_noise(rng: jax.Array, shape: tuple[int, ...], alpha: float) -> jax.Array:
    """NEFTune (Jain et al. 2023): U(-1, 1) * alpha / sqrt(L * d) for [B, L, d] embeddings, with L
    the (padded) row length, as in the reference and HF implementations."""
    return jax.random.uniform(rng, shape, jnp.float32, -1.0, 1.0) * (alpha / math.sqrt(shape[-2] * shape[-1]))


def init_cache(cfg: LlamaConfig, batch: int, slots: int, dtype=jnp.float32) -> dict:
    """Empty key/value cache for `slots` positions, stacked over layers like the weights."""
    shape = (cfg.num_hidden_layers, batch, slots, cfg.num_key_value_heads, cfg.dim_per_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
