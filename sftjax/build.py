"""From a validated config to a model on a mesh: base weights, the transforms that adapt the model,
the trainable/frozen split and the shardings.

Shared by `train`, `generate` and `export`, so all three see exactly the same parameter tree.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from sftjax import host_memory
from sftjax import params as P
from sftjax.data.labels import Head, head_for
from sftjax.errors import UserError
from sftjax.io.load import is_encoder, open_pretrained
from sftjax.models import architecture, layout
from sftjax.models.llama import LlamaConfig, Runtime
from sftjax.parallel import mesh as sharding
from sftjax.peft import freeze, lora, prompt, quant
from sftjax.peft.adapted import Adapted, Transform
from sftjax.peft.export import read_adapter
from sftjax.train.regularisers import EmbedDelta, NEFTune

log = logging.getLogger("sftjax")


@dataclass
class Setup:
    model: Adapted
    tokenizer: Any
    mesh: jax.sharding.Mesh
    trainable: dict  # sharded jax arrays
    frozen: dict  # sharded jax arrays, never donated, never in the optimizer
    rules: dict  # logical axis -> mesh axes (mesh.rules)
    head: Head | None = None  # a task head (task.type classification / token_classification), if any

    @property
    def model_cfg(self) -> LlamaConfig:
        return self.model.cfg

    def full_params(self, trainable=None) -> dict:
        """The tree the model runs on (adapters beside their kernels, if any)."""
        return P.merge(self.frozen, self.trainable if trainable is None else trainable)

    def merged_params(self, trainable=None) -> dict:
        """Plain base-shaped params, layers stacked, every transform folded in (export, plain inference)."""
        return layout.stack(self.model.fold(self.full_params(trainable)))


def runtime(model_cfg, mesh, rules) -> Runtime:
    """How the model computes on this mesh: dtype, remat policy, layer stacking, activation layout."""
    if model_cfg.remat == "offload":
        kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
        if "pinned_host" not in kinds:
            raise UserError(f"model.remat=offload: {jax.devices()[0].platform} devices have no pinned host memory "
                            f"(only {', '.join(sorted(kinds))}); use dots_with_no_batch_dims_saveable or full")
    layout = sharding.ActivationLayout(mesh, tuple(rules.items())) if mesh.size > 1 else None
    return Runtime(model_cfg.dtype, model_cfg.remat, model_cfg.scan_layers, layout)


def transforms(cfg) -> tuple[Transform, ...]:
    """The transforms `cfg` asks for, outermost first (LoRA wraps the quantised matmul)."""
    out: list[Transform] = []
    if cfg.lora.enabled:
        out.append(lora.LoRA(cfg.lora.alpha, cfg.lora.rslora, cfg.lora.dropout))
    if cfg.model.quantize != "none":
        out.append(quant.Quantized())
    if cfg.prompt_tuning.method != "none":
        out.append(prompt.Prompt() if cfg.prompt_tuning.method == "prompt" else prompt.Prefix())
    if cfg.train.neftune_alpha > 0:
        out.append(NEFTune(cfg.train.neftune_alpha))
    if cfg.train.fgm_epsilon > 0:
        out.append(EmbedDelta())
    return tuple(out)


def task_head(module, base: dict, seed: int) -> dict:
    """The leaves `module` has and the base checkpoint has not (a task head: `score` on a decoder,
    `classifier` on an encoder): kernels ~ N(0, 0.02), biases 0, as transformers initialises them."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), np.zeros((1, 8), np.int32)))["params"]
    have = P.flatten(base)
    rng = np.random.default_rng(seed)
    new = {}
    for path, leaf in P.flatten(nn.unbox(abstract)).items():
        if path not in have:
            new[path] = (rng.normal(0, 0.02, leaf.shape) if path.endswith("kernel") else np.zeros(leaf.shape)
                         ).astype(np.float32)
    return P.unflatten(new)


def split(cfg, base: dict, mcfg: LlamaConfig) -> tuple[dict, dict]:
    """(trainable, frozen) trees of lazy leaves (read when placed) and small numpy adapters:
    adapters, a prompt, or base leaves chosen by train.freeze; with model.quantize the frozen
    decoder kernels are stored quantised. DoRA magnitudes are left as shapes (`lora.magnitudes`
    computes them from the placed base)."""
    quantize = (lambda t: t) if cfg.model.quantize == "none" else (lambda t: quant.quantize_tree(t, cfg.model.quantize))
    if cfg.lora.enabled:
        c = cfg.lora
        trainable = lora.init_adapters(base, list(c.targets), c.rank, cfg.train.seed,
                                       rank_overrides=tuple(c.rank_overrides), dora=c.dora)
        if c.init_from:
            trainable = read_adapter(c.init_from, c, trainable, mcfg.num_hidden_layers)
        return trainable, quantize(base)
    if cfg.prompt_tuning.method != "none":  # the whole base stays frozen
        pt = cfg.prompt_tuning
        return prompt.init(pt.method, base, mcfg, pt.length, cfg.train.seed, cfg.model.scan_layers), quantize(base)
    pats = freeze.trainable_patterns(cfg.train, mcfg.num_hidden_layers, mcfg.tie_word_embeddings,
                                     lm_head=cfg.task.type == "causal_lm")
    if not any(p.startswith("norm/") for p in P.flatten(base)):  # an encoder has no final norm
        pats = [p for p in pats if p != r"^norm/"]
    chosen = P.matching(P.flatten(base), pats, "train.trainable" if cfg.train.freeze == "regex" else "train.freeze")
    trainable, frozen = P.split(base, chosen)
    return trainable, quantize(frozen)


def logical_axes(model: Adapted, trees: list[dict]) -> dict:
    """Logical axes of every leaf of `trees`: the model's own for base leaves, the transform's that
    added it for any other (a leaf nobody claims has none, and placing it raises naming it)."""
    base = P.flatten(sharding.logical_axes(model.base, np.zeros((1, 8), np.int32)))
    out = {}
    for path, x in P.flatten(P.merge(*trees)).items():
        axes = base.get(path)
        for t in model.transforms:
            axes = axes if axes is not None else t.axes(path, np.ndim(x), base)
        if axes is not None:
            out[path] = axes
    return P.unflatten(out)


def build(cfg, tokenizer=None) -> Setup:
    """The model, mesh and parameter split for a validated `cfg`; `tokenizer` if already loaded."""
    host_memory.install()  # the steps compiled for this model leave no compiler garbage resident
    mcfg, base, tok = open_pretrained(cfg.model.path, tokenizer)  # lazy: read when placed
    head = head_for(cfg, is_encoder(cfg.model.path))
    if head is not None:  # a task head replaces the vocabulary head
        mcfg = dataclasses.replace(mcfg, num_labels=len(head.names),
                                   **({"pooling": head.position} if hasattr(mcfg, "pooling") else {}))
        base = {k: v for k, v in base.items() if k != "lm_head"}
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from(cfg.mesh)
    model = Adapted(architecture(mcfg)(mcfg, runtime(cfg.model, mesh, rules)), transforms(cfg))
    if not cfg.model.scan_layers:
        base = layout.unstack(base, mcfg.num_hidden_layers)
    trainable, frozen = split(cfg, base, mcfg)
    if head is not None:  # the head always trains, whatever else does
        new = task_head(model.base, base, cfg.train.seed)
        trainable, base = P.merge(trainable, new), P.merge(base, new)  # the model's total includes its head
    n_train, n_all = P.count(trainable), P.count(base)
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{n_train:,}", f"{n_all:,}", 100 * n_train / n_all)
    if cfg.model.quantize != "none":
        log.info("frozen base quantised to %s: %s bytes", cfg.model.quantize, f"{quant.nbytes(frozen):,}")
    axes = logical_axes(model, [trainable, frozen])
    frozen_shardings = sharding.param_shardings(frozen, axes, mesh, rules)  # a parameter that does not split: first
    sharding.check_heads(mesh, mcfg.num_attention_heads, rules)  # then heads, before any weight is read
    frozen = sharding.place(frozen, frozen_shardings)
    shardings = sharding.param_shardings(trainable, axes, mesh, rules)
    trainable = sharding.place(lora.magnitudes(trainable, frozen, shardings), shardings)
    return Setup(model, tok, mesh, trainable, frozen, rules, head)
