"""HF BERT checkpoints (BertModel, BertFor*) -> `BertConfig` and the lazy param tree of `models/bert.py`.

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
from sftjax.params import unflatten

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
