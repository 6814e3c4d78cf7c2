"""Self-training (`sftjax selftrain`): which pseudo-labels are kept, the stratified labelled draw,
selftrain.* validation, and one teacher + student run on the tiny model."""

import json
import os

import numpy as np
import pytest

from sftjax.config import base_config, validate
from sftjax.data.records import Record
from sftjax.errors import UserError
from sftjax.train.selftrain import draw_labelled, select

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_select_keeps_confident_predictions_balanced_and_most_confident_first():
    pred = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    conf = np.array([0.95, 0.99, 0.5, 0.97, 0.92, 0.91, 0.8, 0.93])
    # >= 0.9: class 0 has 0, 1, 5, 7; class 1 has 3, 4. Balanced: 2 of each, the most confident.
    assert select(pred, conf, 2, 0.9, 0).tolist() == [0, 1, 3, 4]
    assert select(pred, conf, 2, 0.9, 3).tolist() == [0, 1, 3, 4, 7]  # cap 3: class 1 has only 2
    assert select(pred, conf, 2, 0.9, 1).tolist() == [1, 3]
    assert select(pred, conf, 2, 0.0, 10).tolist() == list(range(8))
    assert select(pred, conf, 2, 0.999, 0).tolist() == []
    # A class with no confident prediction does not empty the round: the cap is the smallest kept class.
    assert select(np.array([0, 0, 1]), np.array([0.95, 0.96, 0.2]), 2, 0.9, 0).tolist() == [0, 1]


def test_labelled_draw_is_seeded_stratified_and_keeps_the_fraction():
    recs = [Record(f"r:{i}", label="spam" if i % 10 == 0 else "ham") for i in range(1000)]
    lab, pool = draw_labelled(recs, ("ham", "spam"), 0.05, seed=0)
    assert len(lab) + len(pool) == 1000 and not {r.where for r in lab} & {r.where for r in pool}
    assert [r.label for r in lab].count("spam") == 5 and [r.label for r in lab].count("ham") == 45
    assert [r.where for r in lab] == [r.where for r in draw_labelled(recs, ("ham", "spam"), 0.05, 0)[0]]
    assert [r.where for r in lab] != [r.where for r in draw_labelled(recs, ("ham", "spam"), 0.05, 1)[0]]
    tiny, _ = draw_labelled(recs, ("ham", "spam"), 0.001, 0)  # every class at least once
    assert sorted(r.label for r in tiny) == ["ham", "spam"]
    with pytest.raises(UserError, match="'other'"):
        draw_labelled(recs, ("ham", "spam", "other"), 0.1, 0)


@pytest.mark.parametrize("key,value", [("labelled", 0.0), ("labelled", 1.5), ("threshold", 1.2),
                                       ("rounds", 0), ("per_class", -1)])
def test_selftrain_config_mistakes_name_the_key(key, value):
    c = base_config()
    c.selftrain[key] = value
    with pytest.raises(UserError, match=f"selftrain.{key}"):
        validate(c)


def test_selftrain_needs_classification(tiny_config, tmp_path):
    from sftjax.train.selftrain import selftrain

    with pytest.raises(UserError, match="task.type=classification"):
        selftrain(tiny_config, str(tmp_path / "w"))


def test_teacher_and_one_student_on_the_tiny_model(tiny_config, tmp_path):
    from sftjax.cli import main

    c = tiny_config
    c.task.type = "classification"
    c.data.train, c.data.labels = os.path.join(DATA, "classes.jsonl"), ("pos", "neg")
    c.data.max_length = 32
    c.data.eval_fraction = 0.25
    c.train.steps, c.checkpoint.every = 2, 2
    c.data.buckets = 1  # one compile of the step per round
    c.lora.targets = ("all_linear",)
    c.selftrain.labelled, c.selftrain.rounds, c.selftrain.threshold = 0.25, 1, 0.0
    cfg_file = tmp_path / "st.py"
    cfg_file.write_text("from ml_collections import ConfigDict\n"
                        f"def get_config():\n    return ConfigDict({c.to_dict()!r})\n")
    w = tmp_path / "w"
    assert main(["selftrain", f"--config={cfg_file}", f"--workdir={w}"]) == 0
    out = json.loads((w / "selftrain.json").read_text())
    teacher, student = out["rounds"]
    assert [teacher["round"], student["round"]] == [0, 1]
    for row in out["rounds"]:
        assert {"labelled", "pseudo_labelled", "pseudo_accuracy", "examples", "heldout_accuracy",
                "heldout_macro_f1"} <= set(row)
    assert teacher["examples"] == teacher["labelled"] == out["labelled"]
    assert sum(student["pseudo_labelled"].values()) > 0 and 0 <= student["pseudo_accuracy"] <= 1
    assert student["examples"] == student["labelled"] + sum(student["pseudo_labelled"].values())
    assert student["examples"] > teacher["examples"]
    assert out["gain"]["accuracy"] == pytest.approx(student["heldout_accuracy"] - teacher["heldout_accuracy"])
    held = (w / "heldout.jsonl").read_text().splitlines()
    assert len(held) == out["heldout"] > 0
    assert all(os.path.isdir(w / f"round-{k}") for k in (0, 1))
