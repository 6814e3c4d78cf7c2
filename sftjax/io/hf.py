"""HF model folders <-> sftjax's param tree: config.json, safetensors (single or sharded).

Everything funnels through one representation, the HF state dict (names like
`model.layers.3.self_attn.q_proj.weight`, float32, torch [out, in] layout): a GGUF file is
first turned into that (`io/gguf_file.py`), so there is one name mapping to keep right
(`hf_to_lazy`/`params_to_hf`). Reading is lazy (`io/lazy.py`): `open_folder` reads only the
headers, and each leaf of `hf_to_lazy`'s tree reads its slices from the files when placed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from sftjax.errors import UserError
from sftjax.io.lazy import Lazy, Stacked, as_lazy, materialise, safetensors_file
from sftjax.models.llama import LlamaConfig
from sftjax.params import flatten, unflatten

# Per-layer weights: (HF suffix, our path inside `layers`, transpose?)
_LAYER_MAP = [
    ("self_attn.q_proj.weight", "self_attn/q_proj/kernel", True),
    ("self_attn.k_proj.weight", "self_attn/k_proj/kernel", True),
    ("self_attn.v_proj.weight", "self_attn/v_proj/kernel", True),
    ("self_attn.o_proj.weight", "self_attn/o_proj/kernel", True),
    ("self_attn.q_proj.bias", "self_attn/q_proj/bias", False),
    ("self_attn.k_proj.bias", "self_attn/k_proj/bias", False),
    ("self_attn.v_proj.bias", "self_attn/v_proj/bias", False),
    ("mlp.gate_proj.weight", "mlp/gate_proj/kernel", True),
    ("mlp.up_proj.weight", "mlp/up_proj/kernel", True),
    ("mlp.down_proj.weight", "mlp/down_proj/kernel", True),
    ("input_layernorm.weight", "input_layernorm/scale", False),
    ("post_attention_layernorm.weight", "post_attention_layernorm/scale", False),
]
_SUPPORTED = ("llama", "qwen2", "mistral")
# Weights read only from safetensors and GGUF; these pickle formats are refused by name.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> LlamaConfig:
    """LlamaConfig (BertConfig for model_type bert) from a transformers config dict; unsupported
    families raise naming `source`."""
    mtype = hf.get("model_type", "llama")
    if mtype == "bert":
        from sftjax.io.bert import bert_config_from_hf

        return bert_config_from_hf(hf, source)
    if mtype not in _SUPPORTED:
        raise UserError(f"{source}: model_type {mtype!r} is not supported (supported: {', '.join(_SUPPORTED)}, bert)")
    try:
        scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return LlamaConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted((k, v) for k, v in scaling.items() if k != "rope_theta")) if scaling else None,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", mtype == "qwen2")),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_first(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
            model_type=mtype,
        )
    except KeyError as e:
        raise UserError(f"{source}: missing required field {e.args[0]!r}") from None


_TASK_ARCH = {"classification": "SequenceClassification", "token_classification": "TokenClassification"}


def _first(x):
    return x[0] if isinstance(x, list) else x


def config_to_hf(cfg: LlamaConfig, head=None, pad_token_id: int | None = None) -> dict[str, Any]:
    """transformers config dict: the causal LM, or with a task head (`head`: `data.labels.Head`)
    {Llama,Qwen2,Mistral}For{Sequence,Token}Classification with its labels. `pad_token_id` (the
    tokenizer's) replaces the model's: a sequence classifier reads the rightmost token that is not
    it, which is sftjax's last real token when the text holds no pad token."""
    from sftjax.models.bert import BertConfig

    if isinstance(cfg, BertConfig):
        from sftjax.io.bert import bert_config_to_hf

        return bert_config_to_hf(cfg, head) | ({} if pad_token_id is None else {"pad_token_id": pad_token_id})
    family = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[cfg.model_type]
    task = "CausalLM" if not cfg.num_labels else _TASK_ARCH[head.kind] if head is not None else None
    if task is None:
        raise ValueError("config_to_hf: a config with num_labels > 0 needs its head")
    out = {
        "architectures": [f"{family}For{task}"],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.dim_per_head,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id if pad_token_id is None else pad_token_id,
        "torch_dtype": "float32",
    }
    if cfg.num_labels:
        from sftjax.io.bert import label_maps

        out |= label_maps(head.names)
    if cfg.model_type == "llama":
        out["attention_bias"] = cfg.attention_bias
        out["mlp_bias"] = False
    return out


def hf_to_lazy(sd: Mapping[str, Lazy | np.ndarray], cfg: LlamaConfig, source: str) -> dict:
    """HF state dict -> nested param tree of lazy leaves, layer weights stacked on a leading axis.

    Nothing is read here: a leaf reads its slices (through the transposes and the layer stack)
    when it is placed on the mesh. A `BertConfig` reads a BERT checkpoint (`io/bert.py`)."""
    from sftjax.models.bert import BertConfig

    if isinstance(cfg, BertConfig):
        from sftjax.io.bert import bert_to_lazy

        return bert_to_lazy(sd, cfg, source)

    def take(name) -> Lazy:
        if name not in sd:
            raise UserError(f"{source}: tensor {name!r} is missing")
        x = sd[name]
        return x if isinstance(x, Lazy) else as_lazy(np.asarray(x, dtype=np.float32))

    layers: dict[str, Lazy] = {}
    for hf_suffix, path, transpose in _LAYER_MAP:
        if hf_suffix.endswith(".bias") and not cfg.attention_bias:
            continue
        ws = [take(f"model.layers.{i}.{hf_suffix}") for i in range(cfg.num_hidden_layers)]
        layers[path] = Stacked([w.T if transpose else w for w in ws])
    params = {"embed_tokens": {"embedding": take("model.embed_tokens.weight")},
              "norm": {"scale": take("model.norm.weight")}, "layers": unflatten(layers)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": take("lm_head.weight").T}
    return params


def hf_to_params(sd: Mapping[str, Lazy | np.ndarray], cfg: LlamaConfig, source: str) -> dict:
    """HF state dict -> nested numpy param dict (the whole model in memory; see `hf_to_lazy`)."""
    return materialise(hf_to_lazy(sd, cfg, source))


def params_to_hf(params: Mapping, cfg: LlamaConfig, head=None) -> dict[str, np.ndarray]:
    """Inverse of `hf_to_params` (params must hold no LoRA leaves: merge them first). A task head
    is `score.weight`, plus a zero `score.bias` for token classification: transformers' token
    classifier has a bias (sftjax's `score` has none), its sequence classifier none."""
    from sftjax.models.bert import BertConfig

    if isinstance(cfg, BertConfig):
        from sftjax.io.bert import bert_params_to_hf

        return bert_params_to_hf(params, cfg)
    flat = flatten(params["layers"])
    sd = {"model.embed_tokens.weight": params["embed_tokens"]["embedding"],
          "model.norm.weight": params["norm"]["scale"]}
    for hf_suffix, path, transpose in _LAYER_MAP:
        if path not in flat:
            continue
        stacked = np.asarray(flat[path])
        for i in range(cfg.num_hidden_layers):
            sd[f"model.layers.{i}.{hf_suffix}"] = stacked[i].T if transpose else stacked[i]
    if cfg.num_labels:
        sd["score.weight"] = np.asarray(params["score"]["kernel"]).T
        if head is not None and head.kind == "token_classification":
            sd["score.bias"] = np.zeros(cfg.num_labels, np.float32)
    elif not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in sd.items()}


def open_folder(folder: str) -> tuple[LlamaConfig, dict[str, Lazy]]:
    """config.json + model.safetensors (or a sharded index) -> (config, lazy HF state dict).

    Only config.json and the safetensors headers are read."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{folder}: no config.json; point model.path at a HF model folder or a .gguf file")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f), cfg_path)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
        if pickles:  # never unpickled: loading a pickle can run any code the file holds
            raise UserError(f"{os.path.join(folder, pickles[0])}: PyTorch pickle weights are not loaded (unpickling "
                            "can run code); convert the folder to safetensors, e.g. with transformers: "
                            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)")
        raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    sd: dict[str, Lazy] = {}
    for name in files:
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"{os.path.join(folder, name)}: missing (listed in model.safetensors.index.json)")
        sd.update(safetensors_file(os.path.join(folder, name)))
    return cfg, sd


def read_hf_folder(folder: str) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """`open_folder`, every tensor read whole as float32 numpy."""
    cfg, sd = open_folder(folder)
    return cfg, materialise(sd)


def write_hf_folder(folder: str, cfg: LlamaConfig, params: Mapping, tokenizer=None, dtype: str = "float32",
                    max_shard_bytes: int = 2 * 1024**3, head=None) -> None:
    """Write config.json, safetensors (sharded with an index past `max_shard_bytes`) and tokenizer.
    With a task head (`head`, `cfg.num_labels` > 0) the folder is the matching transformers task
    model (`config_to_hf`), its pad_token_id the tokenizer's.

    Writes into a temporary sibling folder and renames it at the end, so a crash never leaves a
    half-written model folder behind.
    """
    import shutil

    import ml_dtypes
    from safetensors.numpy import save_file

    pad = getattr(tokenizer, "pad_token_id", None) if cfg.num_labels else None
    hf_cfg = config_to_hf(cfg, head, pad) | {"torch_dtype": dtype}  # first: it refuses what it cannot write
    sd = params_to_hf(params, cfg, head)
    if dtype == "bfloat16":
        sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        if cur and size + v.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + v.nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.nbytes for v in sd.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
