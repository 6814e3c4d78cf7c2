"""Prompt tuning and prefix tuning (P-tuning v2): small trainable subtrees beside a frozen base.

- prefix: `prefix_k` / `prefix_v` [P, kv_heads, head_dim] in every layer's attention, keys and
  values every query attends to (Li & Liang 2021; P-tuning v2 without the reparameterisation MLP),
  initialised N(0, 0.02). Prefixes carry no rotary position (they are raw keys), and real tokens
  keep their positions, as with PEFT's past-key-value prefixes. `Prefix` puts them in front of
  each attention's keys/values through the `Attention.memory` hook.
- prompt: `prompt_embedding` [P, d], P virtual tokens in front of every sequence (Lester et al.
  2021), initialised from the embeddings of P random vocabulary tokens, which keeps them on the
  scale of real inputs. Virtual tokens attend only to each other, so their keys/values in every
  layer depend on the prompt alone: `Prompt.prepare` computes them with one cached forward pass of
  the virtual tokens (at positions -P..-1, so real tokens keep theirs; rotary attention depends
  only on distances) and hands them to `Prefix`. The logits are the real tokens' only.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sftjax.errors import UserError
from sftjax.io.lazy import as_lazy
from sftjax.models.layers import Embed
from sftjax.models.layout import STACKED, per_layer
from sftjax.models.llama import Attention, LlamaConfig, init_cache
from sftjax.params import flatten, unflatten
from sftjax.peft.adapted import Transform, hook


def init(method: str, base: Mapping, mcfg: LlamaConfig, length: int, seed: int, scan_layers: bool) -> dict:
    """The trainable subtree for `method` (prompt | prefix). `base` may be lazy (`io/lazy.py`):
    a prompt reads only the embedding rows it starts from."""
    rng = np.random.default_rng(seed)
    if method == "prompt":
        emb = as_lazy(flatten(base)["embed_tokens/embedding"])
        ids = rng.integers(0, emb.shape[0], length)
        rows = emb.read_many([(slice(int(i), int(i) + 1), slice(None)) for i in ids])
        return {"prompt_embedding": np.concatenate(rows).astype(np.float32)}
    shape = (mcfg.num_hidden_layers, length, mcfg.num_key_value_heads, mcfg.dim_per_head)
    out = {}
    for leaf in ("prefix_k", "prefix_v"):
        values = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        out |= {f"{name}/self_attn/{leaf}": v for name, v in per_layer(values, scan_layers).items()}
    return unflatten(out)


class Prefix(Transform):
    """Every attention whose params hold `prefix_k`/`prefix_v` also attends to them."""

    method = "prefix"

    def intercept(self, next_fun, args, kwargs, context):
        mod = context.module
        if not (hook(context, Attention, "memory") and mod.has_variable("params", "prefix_k")):
            return next_fun(*args, **kwargs)
        k, v, mask = args
        b = k.shape[0]
        pk, pv = mod.get_variable("params", "prefix_k"), mod.get_variable("params", "prefix_v")
        k = jnp.concatenate([jnp.broadcast_to(pk, (b, *pk.shape)).astype(k.dtype), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(pv, (b, *pv.shape)).astype(v.dtype), v], axis=1)
        mask = jnp.concatenate([jnp.ones((*mask.shape[:2], pk.shape[0]), bool), mask], axis=-1)
        return next_fun(k, v, mask)

    def fold(self, params: Mapping) -> Mapping:
        raise UserError(f"export: a {self.method}-tuned model has no merged HF form (what it learned is not "
                        "a weight of the base architecture)")

    def axes(self, path: str, ndim: int, base: Mapping[str, tuple]) -> tuple | None:
        """Nothing sharded: these leaves are tiny."""
        return (None,) * ndim if path.rpartition("/")[2] in ("prefix_k", "prefix_v", "prompt_embedding") else None


class Prompt(Prefix):
    """`prompt_embedding` -> per-layer `prefix_k`/`prefix_v` (see the module docstring)."""

    method = "prompt"

    def prepare(self, model, params: Mapping) -> Mapping:
        flat = flatten(params)
        if "prompt_embedding" not in flat:
            return params  # already prepared (generation prepares once, then decodes)
        prompt = flat.pop("prompt_embedding")
        n = prompt.shape[0]

        def virtual_tokens(next_fun, args, kwargs, context):
            return prompt[None] if hook(context, Embed) else next_fun(*args, **kwargs)

        with nn.intercept_methods(virtual_tokens):
            _, cache = model.apply(unflatten(flat), jnp.zeros((1, n), jnp.int32), jnp.ones((1, n), bool),
                                   jnp.arange(-n, 0)[None], head_positions=jnp.zeros((1, 1), jnp.int32),
                                   cache=init_cache(model.cfg, 1, n), cache_index=0)
        scan = any(p.startswith(STACKED) for p in flat)
        for leaf, stacked in (("prefix_k", cache["k"][:, 0]), ("prefix_v", cache["v"][:, 0])):  # [L, P, kv, hd]
            flat |= {f"{name}/self_attn/{leaf}": v for name, v in per_layer(stacked, scan).items()}
        return unflatten(flat)
