"""LoRA / DoRA adapters <-> PEFT adapter folders (adapter_config.json + adapter_model.safetensors).

PEFT names a layer's adapter `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
with torch's [out, in] layout: lora_A is [r, in] (our lora_a transposed), lora_B is [out, r], and
DoRA's magnitude is `...q_proj.lora_magnitude_vector` [out]. Per-module ranks go to
`rank_pattern` with the full module name, which PEFT matches as `(.*\\.)?NAME$`. The same mapping
read backwards lets a run start from an existing adapter (`lora.init_from`).

A decoder's task head (`score`, trained whole) goes in as PEFT's `modules_to_save`: saved under
the module's own name (`base_model.model.score.weight`; PEFT adds `modules_to_save.default.` when
loading), with task_type SEQ_CLS or TOKEN_CLS so `PeftModel.from_pretrained` wraps a
`*ForSequenceClassification` / `*ForTokenClassification` base.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np

from sftjax.errors import UserError
from sftjax.models.layout import STACKED, layer_modules
from sftjax.params import flatten, unflatten

_PREFIX = "base_model.model."
_LEAF_TO_PEFT = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


def _hf_modules(module: str, num_layers: int) -> list[tuple[int | None, str]]:
    """Our module path (stacked `layers/..`, unrolled `layers_i/..`, or `lm_head`) -> [(index into
    the array's leading layer axis or None, HF module name)]."""
    out = []
    for index, layer, rest in layer_modules(module, num_layers):
        if layer is None and rest != "lm_head":
            raise UserError(f"lora.targets: {module} has no PEFT name; only decoder layers and lm_head can be exported")
        out.append((index, rest if layer is None else f"model.layers.{layer}.{rest.replace('/', '.')}"))
    return out


def adapter_state_dict(adapters: Mapping, num_layers: int) -> dict[str, np.ndarray]:
    """Our adapter tree (stacked or unrolled layers) -> PEFT's saved state dict."""
    sd = {}
    for path, v in flatten(adapters).items():
        module, leaf = path.rsplit("/", 1)
        if leaf not in _LEAF_TO_PEFT:
            raise UserError(f"export: {path} is not a LoRA/DoRA leaf; --format=peft exports adapters only")
        v = np.asarray(v, np.float32)
        for i, name in _hf_modules(module, num_layers):
            x = v if i is None else v[i]
            sd[f"{_PREFIX}{name}.{_LEAF_TO_PEFT[leaf]}"] = np.ascontiguousarray(x if leaf == "lora_magnitude" else x.T)
    return sd


def adapter_config(lora_cfg, adapters: Mapping, num_layers: int, base_model: str) -> dict:
    """PEFT LoraConfig fields for these adapters (ranks read off the arrays)."""
    ranks = {}
    for path, v in flatten(adapters).items():
        if path.endswith("/lora_a"):
            for _, name in _hf_modules(path[: -len("/lora_a")], num_layers):
                ranks[name] = int(v.shape[-1])
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in ranks})
    every = {f"model.layers.{i}.{n.split('.', 3)[3]}" for n in ranks if n.startswith("model.layers.")
             for i in range(num_layers)}
    if {n for n in ranks if n.startswith("model.layers.")} == every:
        targets: list[str] | str = leaf_names  # the same modules in every layer: plain names
    else:  # layer-specific targets: an exact regex (PEFT full-matches a string target_modules)
        targets = "(" + "|".join(re.escape(n) for n in sorted(ranks)) + ")"
    r = int(lora_cfg.rank)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": float(lora_cfg.alpha),
        "lora_dropout": float(lora_cfg.dropout),
        "target_modules": targets,
        "use_rslora": bool(lora_cfg.rslora),
        "use_dora": bool(lora_cfg.dora),
        "rank_pattern": {name: rk for name, rk in sorted(ranks.items()) if rk != r},
        "alpha_pattern": {},
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


_PEFT_TASK = {"classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}


def write_adapter(folder: str, lora_cfg, adapters: Mapping, num_layers: int, base_model: str,
                  dtype: str = "float32", head=None) -> None:
    """Write a PEFT adapter folder that `peft.PeftModel.from_pretrained(model, folder)` loads.

    With a task head (`head`: `data.labels.Head`; `adapters` then also holds `score/kernel`) the
    head is a module to save and the base to load it on is the task model with `len(head.names)`
    labels."""
    import ml_dtypes
    from safetensors.numpy import save_file

    adapters = dict(adapters)
    score = adapters.pop("score", None) if head is not None else None
    if head is not None and score is None:
        raise UserError("export: the task head `score` is not among the trained leaves; --format=peft needs it")
    sd = adapter_state_dict(adapters, num_layers)
    if score is not None:
        sd[f"{_PREFIX}score.weight"] = np.ascontiguousarray(np.asarray(score["kernel"], np.float32).T)
        if head.kind == "token_classification":  # transformers' token classifier has a bias; ours is 0
            sd[f"{_PREFIX}score.bias"] = np.zeros(len(head.names), np.float32)
    config = adapter_config(lora_cfg, adapters, num_layers, base_model)
    if head is not None:
        config |= {"task_type": _PEFT_TASK[head.kind], "modules_to_save": ["score"]}
    if dtype == "bfloat16":
        sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def read_adapter(folder: str, lora_cfg, like: Mapping, num_layers: int) -> dict:
    """Adapters from a PEFT folder, shaped like `like` (our freshly initialised adapters: the same
    targets, ranks and layer layout); any mismatch raises naming `lora.init_from`."""
    from safetensors.numpy import load_file

    cfg_path, w_path = os.path.join(folder, "adapter_config.json"), os.path.join(folder, "adapter_model.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise UserError(f"lora.init_from: {folder} needs adapter_config.json and adapter_model.safetensors")
    with open(cfg_path) as f:
        pc = json.load(f)
    if pc.get("peft_type") != "LORA":
        raise UserError(f"lora.init_from: {cfg_path}: peft_type {pc.get('peft_type')!r} is not LORA")
    for ours, theirs in (("alpha", "lora_alpha"), ("rslora", "use_rslora"), ("dora", "use_dora")):
        want, got = lora_cfg[ours], pc.get(theirs, False)
        if (float(want) != float(got)) if ours == "alpha" else (bool(want) != bool(got)):
            raise UserError(f"lora.init_from: {cfg_path} has {theirs}={got!r} but lora.{ours}={want!r}; make them agree")
    sd = load_file(w_path)
    out = {}
    used = set()
    for path, ref in flatten(like).items():
        module, leaf = path.rsplit("/", 1)
        parts = []
        for _, name in _hf_modules(module, num_layers):
            key = f"{_PREFIX}{name}.{_LEAF_TO_PEFT[leaf]}"
            if key not in sd:
                raise UserError(f"lora.init_from: {w_path} lacks {key}; lora.targets / lora.rank_overrides must "
                                f"select the adapter's modules")
            used.add(key)
            x = np.asarray(sd[key], np.float32)
            parts.append(x if leaf == "lora_magnitude" else x.T)
        arr = np.stack(parts) if module.startswith(STACKED) else parts[0]  # stacked: one per layer
        if arr.shape != tuple(ref.shape):
            raise UserError(f"lora.init_from: {path} has shape {arr.shape} in {w_path} but {tuple(ref.shape)} "
                            f"here; check lora.rank / lora.rank_overrides")
        out[path] = arr
    extra = sorted(set(sd) - used)
    if extra:
        raise UserError(f"lora.init_from: {w_path} has adapters that lora.targets does not select, e.g. {extra[0]}")
    return unflatten(out)
