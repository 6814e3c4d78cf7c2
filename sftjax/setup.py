"""From a config to a model on a mesh: base weights, trainable/frozen split, shardings.

Shared by `train`, `generate` and `export`, so all three see exactly the same parameter tree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from sftjax import lora, sharding
from sftjax import params as P
from sftjax.models.llama import Llama, LlamaConfig, Runtime
from sftjax.weights import load_pretrained

log = logging.getLogger("sftjax")


@dataclass
class Setup:
    model_cfg: LlamaConfig
    model: Llama
    tokenizer: Any
    mesh: jax.sharding.Mesh
    trainable: dict  # sharded jax arrays
    frozen: dict  # sharded jax arrays, never donated, never in the optimizer
    lora_scale: float

    def full_params(self, trainable=None) -> dict:
        """The tree the model runs on (adapters beside their kernels, if any)."""
        return P.merge(self.frozen, self.trainable if trainable is None else trainable)

    def merged_params(self, trainable=None) -> dict:
        """Plain base-shaped params with LoRA folded in (for export and plain inference)."""
        return lora.merge(self.full_params(trainable), self.lora_scale)


def build(cfg) -> Setup:
    mcfg, base, tok = load_pretrained(cfg.model.path)
    scale = lora.scale(cfg.lora.alpha, cfg.lora.rank, cfg.lora.rslora) if cfg.lora.enabled else 1.0
    rt = Runtime(dtype=cfg.model.dtype, remat=cfg.model.remat, lora_scale=scale,
                 lora_dropout=cfg.lora.dropout if cfg.lora.enabled else 0.0)
    model = Llama(mcfg, rt)
    mesh = sharding.make_mesh(cfg.mesh)
    axes = sharding.logical_axes(model, np.zeros((1, 8), np.int32))
    if cfg.lora.enabled:
        trainable = lora.init_adapters(base, list(cfg.lora.targets), cfg.lora.rank, cfg.train.seed)
        frozen = base
        flat_axes = P.flatten(axes)
        for path in P.flatten(trainable):
            mod, leaf = path.rsplit("/", 1)
            a_axes, b_axes = lora.adapter_axes(flat_axes[f"{mod}/kernel"])
            flat_axes[path] = a_axes if leaf == "lora_a" else b_axes
        axes = P.unflatten(flat_axes)
    else:
        chosen = P.matching(P.flatten(base), list(cfg.train.trainable) or [".*"], "train.trainable")
        trainable, frozen = P.split(base, chosen)
    n_train, n_all = P.count(trainable), P.count(base)
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{n_train:,}", f"{n_all:,}", 100 * n_train / n_all)
    trainable = sharding.place(trainable, sharding.param_shardings(trainable, axes, mesh))
    frozen = sharding.place(frozen, sharding.param_shardings(frozen, axes, mesh))
    return Setup(mcfg, model, tok, mesh, trainable, frozen, scale)
