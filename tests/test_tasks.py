"""Task heads (task.type): where labels sit on tokens, the head on the last non-pad token whatever
the padding, what trains, class weights, and a short run that learns each task."""

import json
import os

import numpy as np
import pytest
from helpers import task_config

from sftjax.config import validate
from sftjax.data import labels as L
from sftjax.data.records import Record
from sftjax.errors import UserError


def test_class_label_sits_on_the_last_token_of_a_decoder_and_on_cls_of_an_encoder(smol_tokenizer):
    from sftjax.io.load import ENCODER_MODEL, load_tokenizer

    rec = Record("t:1", ({"role": "user", "content": "free prize, call now"},), label="spam")
    ids, targets, lab = L.encode(smol_tokenizer, rec, L.Head("classification", ("ham", "spam"), "last"), 64, "right")
    text = smol_tokenizer("free prize, call now")["input_ids"]
    assert ids[:-1].tolist() == text and ids[-1] == smol_tokenizer.pad_token_id  # one pad appended
    assert np.flatnonzero(lab >= 0).tolist() == [len(text) - 1] and lab[len(text) - 1] == 1
    assert targets.tolist() == (lab >= 0).tolist()
    bert = load_tokenizer(ENCODER_MODEL)
    ids, _, lab = L.encode(bert, rec, L.Head("classification", ("ham", "spam"), "first"), 64, "right")
    assert ids[0] == bert.cls_token_id and np.flatnonzero(lab >= 0).tolist() == [0]
    # Too long: cut to max_length, the label on the last kept token; or dropped.
    ids, _, lab = L.encode(smol_tokenizer, rec, L.Head("classification", ("ham", "spam"), "last"), 3, "right")
    assert len(ids) == 4 and lab[2] == 1
    assert L.encode(smol_tokenizer, rec, L.Head("classification", ("ham", "spam"), "last"), 3, "drop") is None
    with pytest.raises(UserError, match="t:1: label 'spam' is not in data.labels"):
        L.encode(smol_tokenizer, rec, L.Head("classification", ("a", "b"), "last"), 64, "right")


def test_bio_tags_go_on_the_first_sub_token_of_each_word():
    from sftjax.io.load import ENCODER_MODEL, load_tokenizer

    bert = load_tokenizer(ENCODER_MODEL)
    head = L.Head("token_classification", ("O", "B-PER", "I-PER", "B-LOC", "I-LOC"), "last")
    rec = Record("t:2", tokens=("Zyxwvut", "Smith", "visited", "Paris"), tags=("B-PER", "I-PER", "O", "B-LOC"))
    ids, targets, lab = L.encode(bert, rec, head, 64, "right")
    pieces = bert.convert_ids_to_tokens(ids[:-1].tolist())
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and len(pieces) > 6  # "Zyxwvut" splits in pieces
    labelled = [(pieces[i], head.names[lab[i]]) for i in np.flatnonzero(lab >= 0)]
    assert labelled == [(bert.tokenize("Zyxwvut")[0], "B-PER"), ("smith", "I-PER"), ("visited", "O"),
                        ("paris", "B-LOC")]
    assert targets.sum() == 4  # continuation pieces, [CLS] and [SEP] carry no label
    assert L.entity_types(("B-PER", "I-PER", "LOC", "O")) == ("PER", "LOC")


def test_task_config_mistakes_name_the_key(tiny_config):
    c = tiny_config
    c.task.type = "classification"
    with pytest.raises(UserError, match="task.type=classification: needs data.labels"):
        validate(c)
    c.data.labels = ("a", "b")
    c.task.class_weights = (1.0,)
    with pytest.raises(UserError, match="task.class_weights: needs one positive weight per data.labels"):
        validate(c)
    c.task.class_weights = ()
    c.task.pooling = "first"
    validate(c)
    with pytest.raises(UserError, match="task.pooling=first: a decoder"):
        L.head_for(c, encoder=False)


def test_balanced_class_weights():
    from ml_collections import ConfigDict

    cfg = ConfigDict({"task": {"class_weights": (), "balance_classes": True}})
    w = L.class_weights(cfg, L.Head("classification", ("a", "b", "c"), "last"), np.array([0, 0, 0, 1, -1, 0]))
    # 5 labels over 3 classes: n / (k * count) = 5/12 for a (4), 5/3 for b (1); c never seen: 1.
    np.testing.assert_allclose(w, [5 / 12, 5 / 3, 1.0], rtol=1e-6)


def test_decoder_head_reads_the_last_real_token_whatever_the_padding(tiny_config):
    from sftjax.build import build

    setup = build(task_config(tiny_config, "classification"))
    assert "score" in setup.trainable and "lm_head" not in setup.full_params()
    params, model = setup.full_params(), setup.model
    toks = np.array([5, 17, 923, 44, 8], np.int32)
    alone = np.asarray(model.apply(params, toks[None]))[0, -1]
    right = np.array([[*toks, 2, 2, 2]], np.int32)
    left = np.array([[2, 2, 2, *toks]], np.int32)
    valid_r, valid_l = right != -1, left != -1
    valid_r[0, 5:], valid_l[0, :3] = False, False
    pos_l = np.maximum(np.cumsum(valid_l, 1) - 1, 0)
    got_r = np.asarray(model.apply(params, right, valid_r, head_positions=np.array([[4]], np.int32)))[0, 0]
    got_l = np.asarray(model.apply(params, left, valid_l, positions=pos_l, head_positions=np.array([[7]], np.int32)))
    assert alone.shape == (2,)
    np.testing.assert_allclose(got_r, alone, atol=1e-5)
    np.testing.assert_allclose(got_l[0, 0], alone, atol=1e-5)


@pytest.mark.parametrize("kind", ["classification", "token_classification"])
def test_a_short_run_learns_the_task_and_leaves_the_base_untouched(tiny_config, tmp_path, kind):
    """LoRA + head: only the adapters and the head are trained and saved, both moved, and the
    held-out score rises (toy data a 2-layer random model can learn in 30 steps)."""
    from sftjax.build import build
    from sftjax.train.checkpoint import trainable_at
    from sftjax.train.loop import run

    c = task_config(tiny_config, kind)
    c.task.balance_classes = True
    c.data.eval_fraction = 0.25
    c.train.steps, c.train.eval_every, c.checkpoint.every = 30, 30, 30
    c.optim.lr = 1e-2
    c.lora.targets = ("all_linear",)
    validate(c)
    res = run(c, str(tmp_path / "w"))
    metric = "accuracy" if kind == "classification" else "f1"
    before, after = res["before"]["eval"][metric], res["after"]["eval"][metric]
    assert after > before and after >= 0.75, (before, after)
    setup = build(c)
    _, trained = trainable_at(str(tmp_path / "w"), setup, c, "latest", False)
    assert set(trained) == {"layers", "score"}
    assert not np.allclose(trained["score"]["kernel"], setup.trainable["score"]["kernel"])
    assert np.abs(np.asarray(trained["layers"]["mlp"]["up_proj"]["lora_b"])).max() > 0
    # `sftjax eval` on the same checkpoint: the full report, consistent with the run's own evaluation.
    from sftjax.cli import main

    assert main(["eval", f"--workdir={tmp_path / 'w'}"]) == 0
    ev = json.load(open(tmp_path / "w" / "eval.json"))
    assert ev[metric] == pytest.approx(after)
    if kind == "classification":
        assert set(ev["per_class"]) == {"pos", "neg"} and np.sum(ev["confusion"]) == ev["examples"]
        images = [v.tag for v in _events(tmp_path / "w" / "tb") if v.metadata.plugin_data.plugin_name == "images"]
        assert images == ["eval/confusion"]
    else:
        assert set(ev["per_type"]) == {"PER", "LOC"}


def _events(folder):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for name in sorted(os.listdir(folder)):
        for event in EventFileLoader(os.path.join(folder, name)).Load():
            yield from event.summary.value


def test_lora_presets_and_layer_freezing_reach_the_encoder(tiny_config):
    """The same extension points on BERT: the qv preset finds query/value in every layer, and
    train.freeze=last_layers trains the last layers and the classifier only."""
    from sftjax.build import build

    c = task_config(tiny_config, "classification")
    c.model.path = "all-minilm-l6-v2"
    c.lora.targets = ("qv",)
    setup = build(c)
    from sftjax import params as P

    assert sorted(P.flatten(setup.trainable)) == [
        "classifier/bias", "classifier/kernel", "layers/attention/query/lora_a", "layers/attention/query/lora_b",
        "layers/attention/value/lora_a", "layers/attention/value/lora_b"]
    c.lora.enabled, c.train.freeze, c.train.last_layers, c.model.scan_layers = False, "last_layers", 1, False
    validate(c)
    trained = {p.split("/")[0] for p in P.flatten(build(c).trainable)}
    assert trained == {"layers_5", "classifier"}
