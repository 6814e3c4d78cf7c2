"""From a config to a model on a mesh: base weights, trainable/frozen split, shardings.

Shared by `train`, `generate` and `export`, so all three see exactly the same parameter tree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from sftjax.parallel import mesh as sharding
from sftjax.peft import export as peft_export
from sftjax.peft import freeze, lora, quant
from sftjax.peft import prompt as prompt_tuning
from sftjax import params as P
from sftjax.errors import UserError
from sftjax.models.llama import Llama, LlamaConfig, Runtime
from sftjax.io.hf import load_pretrained

log = logging.getLogger("sftjax")


@dataclass
class Setup:
    model_cfg: LlamaConfig
    model: Llama
    tokenizer: Any
    mesh: jax.sharding.Mesh
    trainable: dict  # sharded jax arrays
    frozen: dict  # sharded jax arrays, never donated, never in the optimizer

    def full_params(self, trainable=None) -> dict:
        """The tree the model runs on (adapters beside their kernels, if any)."""
        return P.merge(self.frozen, self.trainable if trainable is None else trainable)

    def merged_params(self, trainable=None) -> dict:
        """Plain base-shaped params, layers stacked, LoRA folded in (for export and plain inference)."""
        rt = self.model.rt
        full = quant.dequantize_tree(self.full_params(trainable))
        return freeze.stack(lora.merge(full, rt.lora_alpha, rt.lora_rslora))


def build(cfg, tokenizer=None) -> Setup:
    """The model, mesh and parameter split for `cfg`; `tokenizer` if the caller already loaded it."""
    mcfg, base, tok = load_pretrained(cfg.model.path, tokenizer)
    use_lora = cfg.lora.enabled
    if use_lora and cfg.train.freeze != "full":
        raise UserError(f"train.freeze={cfg.train.freeze}: chooses trainable base parameters without LoRA; "
                        "set lora.enabled=False (with LoRA only the adapters train)")
    if use_lora and cfg.train.trainable:
        raise UserError("train.trainable: chooses trainable base parameters without LoRA; set lora.enabled=False "
                        "and train.freeze=regex (with LoRA only the adapters train)")
    if cfg.prompt_tuning.method != "none" and use_lora:
        raise UserError(f"prompt_tuning.method={cfg.prompt_tuning.method}: trains only the prompt over a frozen "
                        "base; set lora.enabled=False")
    rt = Runtime(dtype=cfg.model.dtype, remat=cfg.model.remat, scan_layers=cfg.model.scan_layers,
                 lora_alpha=cfg.lora.alpha, lora_rslora=cfg.lora.rslora,
                 lora_dropout=cfg.lora.dropout if use_lora else 0.0, neftune_alpha=cfg.train.neftune_alpha)
    model = Llama(mcfg, rt)
    if not rt.scan_layers:
        base = freeze.unstack(base, mcfg.num_hidden_layers)
    mesh = sharding.make_mesh(cfg.mesh)
    axes = sharding.logical_axes(model, np.zeros((1, 8), np.int32))
    if use_lora:
        frozen = base
        if cfg.model.quantize != "none":  # DoRA's magnitudes start from the kernels the model will see
            frozen = quant.quantize_tree(base, cfg.model.quantize)
        seen = base if frozen is base else quant.dequantize_tree(frozen)
        trainable = lora.init_adapters(seen, list(cfg.lora.targets), cfg.lora.rank, cfg.train.seed,
                                       rank_overrides=tuple(cfg.lora.rank_overrides), dora=cfg.lora.dora)
        if cfg.lora.init_from:
            trainable = peft_export.read_adapter(cfg.lora.init_from, cfg.lora, trainable, mcfg.num_hidden_layers)
        flat_axes = P.flatten(axes)
        for path in P.flatten(trainable):
            mod, leaf = path.rsplit("/", 1)
            flat_axes[path] = lora.adapter_axes(flat_axes[f"{mod}/kernel"])[leaf]
        axes = P.unflatten(flat_axes)
    elif cfg.prompt_tuning.method != "none":  # the whole base stays frozen
        frozen = base if cfg.model.quantize == "none" else quant.quantize_tree(base, cfg.model.quantize)
        trainable = prompt_tuning.init(cfg.prompt_tuning.method, base, mcfg, cfg.prompt_tuning.length,
                                       cfg.train.seed, rt.scan_layers)
        axes = P.merge(axes, prompt_tuning.axes(trainable))
    else:
        if cfg.train.freeze == "full" and cfg.train.trainable:
            raise UserError("train.trainable: regexes are used with train.freeze=regex (now 'full')")
        pats = freeze.trainable_patterns(cfg.train, mcfg.num_hidden_layers, mcfg.tie_word_embeddings,
                                         rt.scan_layers)
        chosen = P.matching(P.flatten(base), pats, "train.trainable" if cfg.train.freeze == "regex" else "train.freeze")
        trainable, frozen = P.split(base, chosen)
        if cfg.model.quantize != "none":
            frozen = quant.quantize_tree(frozen, cfg.model.quantize)
    n_train, n_all = P.count(trainable), P.count(base)
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{n_train:,}", f"{n_all:,}", 100 * n_train / n_all)
    if cfg.model.quantize != "none":
        flat_axes = P.flatten(axes)
        for path in P.flatten(frozen):
            mod, leaf = path.rsplit("/", 1)
            if leaf.startswith("kernel_"):
                qa = quant.quantized_axes(flat_axes[f"{mod}/kernel"])
                flat_axes[path] = qa["kernel_absmax"] if leaf == "kernel_absmax" else qa["codes"]
        axes = P.unflatten(flat_axes)
        log.info("frozen base quantised to %s: %s bytes", cfg.model.quantize, f"{quant.nbytes(frozen):,}")
    trainable = sharding.place(trainable, sharding.param_shardings(trainable, axes, mesh))
    frozen = sharding.place(frozen, sharding.param_shardings(frozen, axes, mesh))
    return Setup(mcfg, model, tok, mesh, trainable, frozen)
