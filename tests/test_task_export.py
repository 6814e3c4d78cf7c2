"""Task-head runs exported as transformers task models: a tiny Llama classifier / tagger and the
embedded MiniLM tagger give transformers' logits within 1e-4; what has no transformers twin (a BERT
classification head) is refused before any weight loads; with LoRA, a PEFT adapter whose head is
a module to save gives the same logits on the base task model."""

import json
import os

import jax
import numpy as np
import pytest
from helpers import task_config

from sftjax import params as P
from sftjax.errors import UserError

TEXTS = ["small in a places was story wonderful", "terrible", "with the story places and people terrible days"]
WORDS = [["yesterday", "Bob", "flew", "to", "Berlin"], ["Carol", "Smith", "lives", "in", "Rome", "again"], ["Bob"]]


def _trained_looking(setup, seed=0):
    """The setup's trainable leaves with LoRA B and the head made non-trivial (as after training)."""
    rng = np.random.default_rng(seed)
    flat = {k: np.asarray(v) for k, v in P.flatten(setup.trainable).items()}
    return P.unflatten({k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
                        if k.endswith(("lora_b", "kernel")) else v for k, v in flat.items()})


def _right_padded(tok, kind: str):
    """ids [B, T] right-padded with the tokenizer's pad id, valid [B, T]; the texts hold no pad."""
    if kind == "token_classification":
        seqs = [tok(w, is_split_into_words=True)["input_ids"] for w in ([w[0]] + [" " + x for x in w[1:]]
                                                                        for w in WORDS)]
    else:
        seqs = [tok(t)["input_ids"] for t in TEXTS]
    assert not any(tok.pad_token_id in s for s in seqs)
    t = max(map(len, seqs))
    ids = np.full((len(seqs), t), tok.pad_token_id, np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    return ids, np.arange(t)[None] < np.array([len(s) for s in seqs])[:, None]


def _ours(setup, trainable, ids, valid):
    return np.asarray(setup.model.apply(setup.full_params(trainable), ids, valid))


def _theirs(auto, folder, ids, valid, **kw):
    import torch

    model = auto.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(valid, dtype=torch.long)).logits.numpy(), model


@pytest.mark.parametrize("kind", ["classification", "token_classification"])
def test_llama_task_head_exports_to_transformers_task_model(tiny_config, tmp_path, kind):
    import transformers

    from sftjax.build import build
    from sftjax.io.hf import write_hf_folder

    setup = build(task_config(tiny_config, kind))
    trainable = _trained_looking(setup)
    out = str(tmp_path / "merged")
    write_hf_folder(out, setup.model_cfg, jax.tree.map(np.asarray, setup.merged_params(trainable)),
                    setup.tokenizer, head=setup.head)  # what `sftjax export` calls
    ids, valid = _right_padded(setup.tokenizer, kind)
    ours = _ours(setup, trainable, ids, valid)
    if kind == "classification":
        theirs, model = _theirs(transformers.AutoModelForSequenceClassification, out, ids, valid)
        ours = ours[np.arange(len(ids)), valid.sum(1) - 1]  # sftjax's head reads the last real token
        assert type(model).__name__ == "LlamaForSequenceClassification"
        assert model.config.pad_token_id == setup.tokenizer.pad_token_id
    else:
        theirs, model = _theirs(transformers.AutoModelForTokenClassification, out, ids, valid)
        ours, theirs = ours[valid], theirs[valid]
        assert type(model).__name__ == "LlamaForTokenClassification"
    assert model.config.id2label == dict(enumerate(setup.head.names))
    err = float(np.abs(ours - theirs).max())
    print(f"{kind}: max |logit error| {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("kind", ["classification", "token_classification"])
def test_llama_task_head_peft_adapter_saves_the_head(tiny_config, tmp_path, kind):
    import peft
    import transformers

    from sftjax.build import build
    from sftjax.peft.export import write_adapter

    c = task_config(tiny_config, kind)
    setup = build(c)
    trainable = _trained_looking(setup, seed=1)
    out = str(tmp_path / "adapter")
    write_adapter(out, c.lora, trainable, setup.model_cfg.num_hidden_layers, c.model.path, head=setup.head)
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["modules_to_save"] == ["score"]
    ids, valid = _right_padded(setup.tokenizer, kind)
    auto = (transformers.AutoModelForSequenceClassification if kind == "classification"
            else transformers.AutoModelForTokenClassification)
    import torch

    base = auto.from_pretrained(c.model.path, num_labels=len(setup.head.names), dtype=torch.float32,
                                pad_token_id=setup.tokenizer.pad_token_id)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(valid, dtype=torch.long)).logits.numpy()
    ours = _ours(setup, trainable, ids, valid)
    ours, theirs = ((ours[np.arange(len(ids)), valid.sum(1) - 1], theirs) if kind == "classification"
                    else (ours[valid], theirs[valid]))
    err = float(np.abs(ours - theirs).max())
    print(f"peft {kind}: max |logit error| {err:.2e}")
    assert err < 1e-4


def _encoder_config(kind: str):
    from sftjax.config import base_config

    c = task_config(base_config(), kind)
    c.model.path = "all-minilm-l6-v2"
    c.lora.enabled = False
    c.mesh.data = 1
    return c


def test_bert_token_classification_exports_to_bert_for_token_classification(tmp_path):
    import transformers

    from sftjax.build import build
    from sftjax.io.hf import write_hf_folder

    setup = build(_encoder_config("token_classification"))
    trainable = _trained_looking(setup)
    out = str(tmp_path / "bert")
    write_hf_folder(out, setup.model_cfg, jax.tree.map(np.asarray, setup.merged_params(trainable)),
                    setup.tokenizer, head=setup.head)
    ids, valid = _right_padded(setup.tokenizer, "token_classification")
    theirs, model = _theirs(transformers.AutoModelForTokenClassification, out, ids, valid)
    assert type(model).__name__ == "BertForTokenClassification"
    ours = _ours(setup, trainable, ids, valid)
    err = float(np.abs(ours[valid] - theirs[valid]).max())
    print(f"bert token_classification: max |logit error| {err:.2e}")
    assert err < 1e-4


def test_bert_classification_export_is_refused_before_loading(tmp_path, capsys):
    from sftjax import cli
    from sftjax.config import validate
    from sftjax.train.workdir import write_config

    c = _encoder_config("classification")
    validate(c)
    wd = tmp_path / "run"
    wd.mkdir()
    write_config(c, str(wd))
    assert cli.main(["export", f"--workdir={wd}", f"--out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "BertForSequenceClassification first passes [CLS] through BERT's pooler" in err
    assert "sftjax eval" in err
    assert cli.main(["export", f"--workdir={wd}", f"--out={tmp_path / 'out'}", "--format=peft"]) == 2
    assert "PEFT names exist for decoder layers only" in capsys.readouterr().err
    from sftjax.data.labels import Head
    from sftjax.io.bert import bert_config_to_hf
    from sftjax.models.bert import BertConfig

    with pytest.raises(UserError, match="pooler"):  # the writer refuses too, whoever calls it
        bert_config_to_hf(BertConfig(10, 8, 1, 2, 16, num_labels=2), Head("classification", ("a", "b"), "first"))
