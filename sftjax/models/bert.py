"""BERT-family bidirectional encoder (BERT, MiniLM, sentence-transformers encoders) in Flax linen.

Architecture only, like `models/llama.py`, whose call signature and `Runtime` it shares so the
train step, evaluation and the PEFT transforms run either model unchanged: every linear layer is a
`Dense` and the word embedding an `Embed` (the hook points of `models/layers.py`), so LoRA, QLoRA
and NEFTune apply as they do to Llama. Parameter names follow HF's BertModel so LoRA targets read
naturally (`attention/(query|value)$`):

    embeddings/{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}
    layers/attention/{query, key, value, output, LayerNorm}   (HF attention.self.* / attention.output.*)
    layers/intermediate                                       (HF intermediate.dense)
    layers/output, layers/output_norm                         (HF output.dense, output.LayerNorm)
    classifier                                                (only with num_labels > 0)

Layers are stacked with `nn.scan` under `layers` (leading layer axis), or unrolled into `layers_i`
with `Runtime.scan_layers=False` (same math; `models/layout.py` converts between the two).
Token type ids are always 0 (row 0 of token_type_embeddings is added to every token).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from sftjax.models.layers import Dense, Embed, grouped_attention, pin
from sftjax.models.llama import Runtime, remat_policy

POOLING = ("first", "last", "mean")
# HF hidden_act -> tanh approximation? ("gelu" is the exact erf form).
GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture hyper-parameters, named as in transformers' BertConfig, plus the task head:
    `num_labels` > 0 adds a `classifier` over the (pooled) states; `pooling` says which states
    ("first": [CLS] / "last": the token at the label's position, both as they are; "mean": the mean
    over the sequence's valid tokens, the same at every position)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int | None = 0
    model_type: str = "bert"
    num_labels: int = 0
    pooling: str = "first"

    # What generic (decoder-minded) code asks of a config.
    @property
    def tie_word_embeddings(self) -> bool:
        return False

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def eos_token_id(self) -> None:
        return None

    @property
    def bos_token_id(self) -> None:
        return None


class LayerNorm(nn.Module):
    """LayerNorm with float32 scale/bias, computed in float32 (two-pass variance, as torch does)."""

    eps: float
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                          (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class Embeddings(nn.Module):
    """Word + absolute position + token type 0 embeddings, then LayerNorm."""

    cfg: BertConfig
    rt: Runtime

    @nn.compact
    def __call__(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(input_ids)
        # Few rows (512 positions, 2 types): replicated over the mesh, never split like the vocabulary.
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
        pos = self.param("position_embeddings", init, (cfg.max_position_embeddings, cfg.hidden_size), jnp.float32)
        typ = self.param("token_type_embeddings", init, (cfg.type_vocab_size, cfg.hidden_size), jnp.float32)
        x = x + jnp.take(pos, positions, axis=0) + typ[0]
        return LayerNorm(cfg.layer_norm_eps, self.rt.dtype, name="LayerNorm")(x)


class Attention(nn.Module):
    cfg: BertConfig
    rt: Runtime

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg, dtype, lay = self.cfg, self.rt.dtype, self.rt.layout
        b, t, _ = x.shape
        nh, hd = cfg.num_attention_heads, cfg.dim_per_head
        q, k, v = (pin(lay, Dense(nh * hd, ("embed", "heads"), True, dtype, name=n)(x).reshape(b, t, nh, hd),
                       ("batch", "length", "heads", None)) for n in ("query", "key", "value"))
        k, v, mask = self.memory(k, v, mask)
        out = grouped_attention(q, k, v, mask, dtype)
        out = Dense(cfg.hidden_size, ("heads", "embed"), True, dtype, name="output")(out)
        return LayerNorm(cfg.layer_norm_eps, dtype, name="LayerNorm")(x + out)

    def memory(self, k: jax.Array, v: jax.Array, mask: jax.Array):
        """Hook point, as in `llama.Attention.memory`: extra keys/values (prefix tuning). None here."""
        return k, v, mask


class Block(nn.Module):
    """Post-norm encoder layer: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))."""

    cfg: BertConfig
    rt: Runtime

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array):
        cfg, rt = self.cfg, self.rt
        x = pin(rt.layout, x, ("batch", "length", None))
        x = Attention(cfg, rt, name="attention")(x, mask)
        h = Dense(cfg.intermediate_size, ("embed", "mlp"), True, rt.dtype, name="intermediate")(x)
        h = pin(rt.layout, jax.nn.gelu(h, approximate=GELU[cfg.hidden_act]), ("batch", "length", "mlp"))
        h = Dense(cfg.hidden_size, ("mlp", "embed"), True, rt.dtype, name="output")(h)
        return LayerNorm(cfg.layer_norm_eps, rt.dtype, name="output_norm")(x + h), None


class Bert(nn.Module):
    """Bidirectional encoder. Same call as `Llama` (a `cache` is refused: nothing to decode).

    `valid` [B, T] marks real tokens (padding is masked as a key); `segment_ids` [B, T] (packing)
    restrict attention, and the "mean" pooling, to a token's own segment; `positions` default to
    0..T-1 (pass per-segment positions with packing). Returns float32 [B, T, hidden] final states
    with `num_labels == 0`, else float32 logits [B, T, num_labels]; with `head_positions` [B, K]
    only those positions are returned ([B, K, ...]), the head running only there.
    """

    cfg: BertConfig
    rt: Runtime = Runtime()

    @nn.compact
    def __call__(self, input_ids: jax.Array, valid: jax.Array | None = None, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, head_positions: jax.Array | None = None,
                 cache: dict | None = None, cache_index: jax.Array | None = None):
        cfg, rt = self.cfg, self.rt
        if cache is not None or cache_index is not None:
            raise ValueError("Bert is an encoder: it has no key/value cache (cache and cache_index must be None)")
        if cfg.pooling not in POOLING:
            raise ValueError(f"BertConfig.pooling: {cfg.pooling!r} is not one of {', '.join(POOLING)}")
        b, t = input_ids.shape
        valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = jnp.broadcast_to(valid[:, None, :], (b, t, t))
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        x = Embeddings(cfg, rt, name="embeddings")(input_ids, positions).astype(rt.dtype)
        x = self.encoder(x, mask).astype(jnp.float32)
        if cfg.num_labels and cfg.pooling == "mean":
            # Row i averages the tokens query i may attend to: its sequence's (or segment's) valid ones.
            w = mask.astype(jnp.float32)
            x = jnp.einsum("bts,bsh->bth", w, x) / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
        if head_positions is not None:
            x = jnp.take_along_axis(x, head_positions[..., None], axis=1)
        if not cfg.num_labels:
            return x
        logits = Dense(cfg.num_labels, ("embed", "classes"), True, rt.dtype, name="classifier")(x.astype(rt.dtype))
        return logits.astype(jnp.float32)

    @nn.nowrap
    def encoder(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """The layer stack, scanned (one `layers` subtree) or unrolled (`layers_i`)."""
        cfg, rt = self.cfg, self.rt
        remat, policy = remat_policy(rt.remat)
        block = nn.remat(Block, policy=policy, prevent_cse=not rt.scan_layers) if remat else Block
        if rt.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast,), length=cfg.num_hidden_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            return stack(cfg, rt, name="layers")(x, mask)[0]
        for i in range(cfg.num_hidden_layers):
            x, _ = block(cfg, rt, name=f"layers_{i}")(x, mask)
        return x
