"""Prompt tuning and prefix tuning (P-tuning v2): small trainable subtrees beside a frozen base.

- prompt: `prompt_embedding` [P, d], P virtual tokens the model prepends to every sequence
  (Lester et al. 2021). Initialised from the embeddings of P random vocabulary tokens, which keeps
  them on the scale of real inputs. The model drops their outputs, so logits line up with labels.
- prefix: `prefix_k` / `prefix_v` [P, kv_heads, head_dim] in every layer's attention, keys and
  values every query attends to (Li & Liang 2021; P-tuning v2 without the reparameterisation MLP),
  initialised N(0, 0.02). Prefixes carry no rotary position (they are raw keys), and real tokens
  keep their positions, as with PEFT's past-key-value prefixes.

Both are picked up by the model from the param tree, like LoRA adapters.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sftjax.models.llama import LlamaConfig
from sftjax.params import flatten, unflatten


def init(method: str, base: Mapping, mcfg: LlamaConfig, length: int, seed: int, scan_layers: bool) -> dict:
    """The trainable subtree for `method` (prompt | prefix)."""
    rng = np.random.default_rng(seed)
    if method == "prompt":
        emb = np.asarray(flatten(base)["embed_tokens/embedding"])
        ids = rng.integers(0, emb.shape[0], length)
        return {"prompt_embedding": emb[ids].astype(np.float32)}
    shape = (length, mcfg.num_key_value_heads, mcfg.dim_per_head)
    out = {}
    layers = ["layers"] if scan_layers else [f"layers_{i}" for i in range(mcfg.num_hidden_layers)]
    lead = (mcfg.num_hidden_layers,) if scan_layers else ()
    for name in layers:
        for leaf in ("prefix_k", "prefix_v"):
            out[f"{name}/self_attn/{leaf}"] = (0.02 * rng.standard_normal((*lead, *shape))).astype(np.float32)
    return unflatten(out)


def axes(tree: Mapping) -> dict:
    """Logical axes: nothing sharded (these are tiny)."""
    return unflatten({p: (None,) * np.ndim(v) for p, v in flatten(tree).items()})
