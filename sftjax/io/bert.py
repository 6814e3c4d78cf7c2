"""HF BERT checkpoints (BertModel, BertFor*) -> `BertConfig` and the lazy param tree of `models/bert.py`.

And back (`bert_config_to_hf`, `bert_params_to_hf`): a tagging run exports as BertForTokenClassification.

`io/hf.py` dispatches here by `model_type` (config) and by config class (weights). BertModel
checkpoints name tensors `embeddings...`/`encoder...`; the task models (BertForSequenceClassification
...) put the same tensors under `bert.`; both are read. The pooler is not used (the task head sits
on the token states) and is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sftjax.errors import UserError
from sftjax.io.lazy import Lazy, Stacked, as_lazy
from sftjax.models.bert import GELU, BertConfig
from sftjax.params import flatten, unflatten

# Per-layer weights: (HF suffix after `encoder.layer.{i}.`, our path inside `layers`, transpose?)
_LAYER_MAP = [
    *((f"attention.self.{n}.{w}", f"attention/{n}/{ours}", t)
      for n in ("query", "key", "value") for w, ours, t in (("weight", "kernel", True), ("bias", "bias", False))),
    ("attention.output.dense.weight", "attention/output/kernel", True),
    ("attention.output.dense.bias", "attention/output/bias", False),
    ("attention.output.LayerNorm.weight", "attention/LayerNorm/scale", False),
    ("attention.output.LayerNorm.bias", "attention/LayerNorm/bias", False),
    ("intermediate.dense.weight", "intermediate/kernel", True),
    ("intermediate.dense.bias", "intermediate/bias", False),
    ("output.dense.weight", "output/kernel", True),
    ("output.dense.bias", "output/bias", False),
    ("output.LayerNorm.weight", "output_norm/scale", False),
    ("output.LayerNorm.bias", "output_norm/bias", False),
]


def bert_config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> BertConfig:
    """BertConfig from a transformers config dict. The task head (num_labels, pooling) is the
    task's to set (`dataclasses.replace`): the encoder alone is num_labels=0."""
    act = hf.get("hidden_act", "gelu")
    if act not in GELU:
        raise UserError(f"{source}: hidden_act {act!r} is not supported for bert (supported: {', '.join(GELU)})")
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise UserError(f"{source}: position_embedding_type {kind!r} is not supported for bert (only absolute)")
    try:
        return BertConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=act,
            pad_token_id=hf.get("pad_token_id", 0),
        )
    except KeyError as e:
        raise UserError(f"{source}: missing required field {e.args[0]!r}") from None


def bert_to_lazy(sd: Mapping[str, Lazy | np.ndarray], cfg: BertConfig, source: str) -> dict:
    """HF BERT state dict -> nested param tree of lazy leaves, layer weights stacked on a leading
    axis, Linear weights transposed to [in, out]. A `classifier` in the checkpoint is taken when
    its shape fits `cfg.num_labels`; otherwise the task head is left for the caller to initialise."""
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in sd else ""

    def take(name: str, full: bool = False) -> Lazy:
        name = name if full else prefix + name
        old = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        name = old if name not in sd and old in sd else name  # TF-era checkpoints name LayerNorm gamma/beta
        if name not in sd:
            raise UserError(f"{source}: tensor {name!r} is missing")
        x = sd[name]
        return x if isinstance(x, Lazy) else as_lazy(np.asarray(x, dtype=np.float32))

    layers = {}
    for hf_suffix, path, transpose in _LAYER_MAP:
        ws = [take(f"encoder.layer.{i}.{hf_suffix}") for i in range(cfg.num_hidden_layers)]
        layers[path] = Stacked([w.T if transpose else w for w in ws])
    params = {
        "embeddings": {
            "word_embeddings": {"embedding": take("embeddings.word_embeddings.weight")},
            "position_embeddings": take("embeddings.position_embeddings.weight"),
            "token_type_embeddings": take("embeddings.token_type_embeddings.weight"),
            "LayerNorm": {"scale": take("embeddings.LayerNorm.weight"), "bias": take("embeddings.LayerNorm.bias")},
        },
        "layers": unflatten(layers),
    }
    if cfg.num_labels and "classifier.weight" in sd and tuple(sd["classifier.weight"].shape)[0] == cfg.num_labels:
        params["classifier"] = {"kernel": take("classifier.weight", True).T, "bias": take("classifier.bias", True)}
    return params


# Why a BERT classification run has no merged HF folder (BertForSequenceClassification differs).
SEQ_CLS_REFUSAL = (
    "export: a BERT classification head cannot be written as a transformers folder: sftjax's `classifier` "
    "reads the encoder's [CLS] state (or a mean) directly, while BertForSequenceClassification first passes "
    "[CLS] through BERT's pooler (dense + tanh), so no weights make the two agree. Use the run itself: "
    "`sftjax eval --workdir=...` for its scores, or its checkpoint; token classification runs "
    "(BertForTokenClassification) export fine")


def bert_config_to_hf(cfg: BertConfig, head=None) -> dict[str, Any]:
    """Inverse of `bert_config_from_hf`: BertModel, or BertForTokenClassification with a tagging head
    (`head`: `data.labels.Head`; a classification head raises `SEQ_CLS_REFUSAL`)."""
    out = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": cfg.hidden_act,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "torch_dtype": "float32",
    }
    if cfg.num_labels:
        if head is None or head.kind != "token_classification":
            raise UserError(SEQ_CLS_REFUSAL)
        out["architectures"] = ["BertForTokenClassification"]
        out |= label_maps(head.names)
    return out


def label_maps(names) -> dict[str, Any]:
    """transformers' num_labels / id2label / label2id for class names (class id i is names[i])."""
    return {"num_labels": len(names), "id2label": {str(i): n for i, n in enumerate(names)},
            "label2id": {n: i for i, n in enumerate(names)}}


def bert_params_to_hf(params: Mapping, cfg: BertConfig) -> dict[str, np.ndarray]:
    """Inverse of `bert_to_lazy` (no LoRA leaves: merge them first). With a head the names are
    BertForTokenClassification's (`bert.` prefix, `classifier.*`), and there is no pooler."""
    prefix = "bert." if cfg.num_labels else ""
    emb = params["embeddings"]
    sd = {"embeddings.word_embeddings.weight": emb["word_embeddings"]["embedding"],
          "embeddings.position_embeddings.weight": emb["position_embeddings"],
          "embeddings.token_type_embeddings.weight": emb["token_type_embeddings"],
          "embeddings.LayerNorm.weight": emb["LayerNorm"]["scale"],
          "embeddings.LayerNorm.bias": emb["LayerNorm"]["bias"]}
    flat = flatten(params["layers"])
    for hf_suffix, path, transpose in _LAYER_MAP:
        stacked = np.asarray(flat[path])
        for i in range(cfg.num_hidden_layers):
            sd[f"encoder.layer.{i}.{hf_suffix}"] = stacked[i].T if transpose else stacked[i]
    sd = {prefix + k: v for k, v in sd.items()}
    if cfg.num_labels:
        sd["classifier.weight"] = np.asarray(params["classifier"]["kernel"]).T
        sd["classifier.bias"] = params["classifier"]["bias"]
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in sd.items()}
