"""Llama-family decoder (Llama, SmolLM, Qwen2, Mistral) as a pure-functional Flax linen module.

Architecture only: PEFT methods and input transforms plug in from outside through the hook points
of `models/layers.py` (`Dense`, `Embed`) and `Attention.memory`. Every parameter carries logical
axis names (embed, mlp, heads, kv, vocab, layers) so `sftjax.parallel` can map them onto any
mesh. Layers are stacked with `nn.scan` (one compiled block, leading `layers` axis on every block
weight), which keeps compile time flat in depth; `Runtime.scan_layers=False` unrolls them into
`layers_0 .. layers_{L-1}` subtrees (same math; see `models/layout.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sftjax.models.layers import (
    ADAPTED,
    ATTENTION_LSE,
    Dense,
    Embed,
    RMSNorm,
    apply_rope,
    attention_mask,
    cache_mask,
    causal_attention,
    grouped_attention,
    pin,
    rope_inv_freq,
)


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
    # > 0: a task head `score` [hidden, num_labels] replaces the vocabulary head (classification,
    # token classification); the logits are then per class. Not part of the base checkpoint.
    num_labels: int = 0

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the model computes, as opposed to what it is: compute dtype, remat policy (see
    `REMAT`), layer stacking, and where activations live on the mesh (None: XLA decides)."""

    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    layout: Any = None  # an object with pin(x, logical axes), e.g. parallel.mesh.ActivationLayout


def remat_policy(name: str):
    """`model.remat` -> (rematerialise?, jax checkpoint policy). What each keeps for the backward
    pass: full keeps only the layer inputs; dots_saveable every matmul output the backward needs;
    the no-batch-dims variant only weight matmuls (attention's batched einsums are recomputed);
    both also keep attention's log-normaliser; offload keeps the weight matmuls in pinned host
    memory instead of device memory."""
    cp = jax.checkpoint_policies
    # With LoRA both of a Dense's matmuls (W x and s B A x) would count as saveable and be kept;
    # the backward needs only their sum, named ADAPTED: one residual per adapted layer, not two.
    # Attention's log-normaliser (ATTENTION_LSE, one float per query and head) spares the backward
    # a second run of attention's forward.
    adapted = cp.save_only_these_names(ADAPTED, ATTENTION_LSE)
    policies = {"none": (False, None), "full": (True, None),
                "dots_saveable": (True, cp.save_from_both_policies(cp.dots_saveable, adapted)),
                "dots_with_no_batch_dims_saveable":
                    (True, cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable, adapted)),
                "offload": (True, cp.offload_dot_with_no_batch_dims("device", "pinned_host"))}
    return policies[name]


class Attention(nn.Module):
    cfg: LlamaConfig
    rt: Runtime

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache=None, cache_index=None):
        """Returns (output, updated cache); with a cache, k/v of `x` are written at `cache_index`
        and attention runs over all cache slots (mask [B, T, S])."""
        cfg, dtype = self.cfg, self.rt.dtype
        b, t, _ = x.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
        q = Dense(nh * hd, ("embed", "heads"), cfg.attention_bias, dtype, name="q_proj")(x)
        k = Dense(nkv * hd, ("embed", "kv"), cfg.attention_bias, dtype, name="k_proj")(x)
        v = Dense(nkv * hd, ("embed", "kv"), cfg.attention_bias, dtype, name="v_proj")(x)
        inv_freq = rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling)
        lay = self.rt.layout
        q = pin(lay, apply_rope(q.reshape(b, t, nh, hd), positions, inv_freq), ("batch", "length", "heads", None))
        k = pin(lay, apply_rope(k.reshape(b, t, nkv, hd), positions, inv_freq), ("batch", "length", "kv", None))
        v = pin(lay, v.reshape(b, t, nkv, hd), ("batch", "length", "kv", None))
        if cache is not None:
            at = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)
            cache = {"k": k, "v": v}
        k, v, mask = self.memory(k, v, mask)
        out = grouped_attention(q, k, v, mask, dtype) if cache is not None else causal_attention(q, k, v, mask, dtype)
        return Dense(cfg.hidden_size, ("heads", "embed"), False, dtype, name="o_proj")(out), cache

    def memory(self, k: jax.Array, v: jax.Array, mask: jax.Array):
        """Hook point: keys/values [B, S, KV, D] with their mask [B, T, S] -> the same with extra
        entries every query may attend to put in front (prefix tuning). The base model adds none."""
        return k, v, mask


class MLP(nn.Module):
    cfg: LlamaConfig
    rt: Runtime

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inter, hidden, dtype = self.cfg.intermediate_size, self.cfg.hidden_size, self.rt.dtype
        gate = Dense(inter, ("embed", "mlp"), False, dtype, name="gate_proj")(x)
        up = Dense(inter, ("embed", "mlp"), False, dtype, name="up_proj")(x)
        h = pin(self.rt.layout, nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Dense(hidden, ("mlp", "embed"), False, dtype, name="down_proj")(h)


class Block(nn.Module):
    cfg: LlamaConfig
    rt: Runtime

    @nn.compact
    def __call__(self, x, positions, mask, cache, cache_index):
        cfg, rt = self.cfg, self.rt
        x = pin(rt.layout, x, ("batch", "length", None))  # the layer boundary: rows over data (and fsdp)
        h = RMSNorm(cfg.rms_norm_eps, rt.dtype, name="input_layernorm")(x)
        a, cache = Attention(cfg, rt, name="self_attn")(h, positions, mask, cache, cache_index)
        x = x + a
        h = RMSNorm(cfg.rms_norm_eps, rt.dtype, name="post_attention_layernorm")(x)
        return x + MLP(cfg, rt, name="mlp")(h), cache


class Llama(nn.Module):
    """Decoder-only LM. Returns float32 logits [B, T, vocab] ([B, T, num_labels] with a task head).

    With `head_positions` [B, K] the vocabulary head runs only at those positions and the logits
    are [B, K, vocab]: when few tokens are targets (short replies to long prompts) this skips most
    of the head's cost, which for small models is a large share of the whole step.

    The call splits in two for a loss that never holds all logits at once (`train/loss.py`):
    `features_only=True` returns the final hidden states [B, T, hidden] (after the head-position
    gather, before the final norm), and `features=` runs only the norm and the head on such states
    (`input_ids` is then ignored). Both run through the same modules, so hooks apply to each part.

    With a `cache` (from `init_cache`) the call is one decoding step: `input_ids` occupy cache
    slots `cache_index ..`, `valid` [B, S] marks which of the S slots hold real tokens (prompt
    padding does not), `positions` must be given, and the result is (logits, updated cache).
    """

    cfg: LlamaConfig
    rt: Runtime = Runtime()

    @nn.compact
    def __call__(self, input_ids: jax.Array, valid: jax.Array | None = None, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, head_positions: jax.Array | None = None,
                 cache: dict | None = None, cache_index: jax.Array | None = None, *,
                 features_only: bool = False, features: jax.Array | None = None):
        cfg, rt = self.cfg, self.rt
        embed = Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens")
        if features is not None:
            x = features
        else:
            b, t = input_ids.shape
            if valid is None:
                valid = jnp.ones((b, t), bool)
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t), (b, t))
            mask = attention_mask(valid, segment_ids) if cache is None else cache_mask(valid, t, cache_index)
            x = embed(input_ids).astype(rt.dtype)
            x, cache = self.decoder(x, positions, mask, cache, cache_index)
            if head_positions is not None:
                x = jnp.take_along_axis(x, head_positions[..., None], axis=1)
            if features_only:
                return x
        x = RMSNorm(cfg.rms_norm_eps, rt.dtype, name="norm")(x)
        if cfg.num_labels:
            logits = Dense(cfg.num_labels, ("embed", "classes"), False, rt.dtype, name="score")(x)
        elif cfg.tie_word_embeddings:
            logits = embed.attend(x, rt.dtype)
        else:
            logits = Dense(cfg.vocab_size, ("embed", "vocab"), False, rt.dtype, name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, cache)

    @nn.nowrap
    def decoder(self, x, positions, mask, cache, cache_index):
        """The decoder stack, scanned (one `layers` subtree) or unrolled (`layers_i`)."""
        cfg, rt = self.cfg, self.rt
        remat, policy = remat_policy(rt.remat)
        # Inside nn.scan the loop already stops XLA from merging recomputation with the forward pass.
        block = nn.remat(Block, policy=policy, prevent_cse=not rt.scan_layers) if remat else Block
        if rt.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_hidden_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            return stack(cfg, rt, name="layers")(x, positions, mask, cache, cache_index)
        # A per-layer cache (a list, `init_cache(per_layer=True)`) stays one buffer per layer, each
        # written in place; a stacked one is sliced per layer and stacked again.
        per_layer = isinstance(cache, list)
        caches = []
        for i in range(cfg.num_hidden_layers):
            layer_cache = None if cache is None else cache[i] if per_layer else jax.tree.map(lambda c, i=i: c[i], cache)
            x, layer_cache = block(cfg, rt, name=f"layers_{i}")(x, positions, mask, layer_cache, cache_index)
            caches.append(layer_cache)
        if cache is None or per_layer:
            return x, None if cache is None else caches
        return x, jax.tree.map(lambda *cs: jnp.stack(cs), *caches)


def init_cache(cfg: LlamaConfig, batch: int, slots: int, dtype=jnp.float32, per_layer: bool = False) -> dict | list:
    """Empty key/value cache for `slots` positions, stacked over layers like the weights; with
    `per_layer` a list of one such dict per layer (for unrolled layers only)."""
    shape = (batch, slots, cfg.num_key_value_heads, cfg.dim_per_head)
    if per_layer:
        return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_hidden_layers)]
    shape = (cfg.num_hidden_layers, *shape)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
