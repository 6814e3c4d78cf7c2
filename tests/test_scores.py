"""sftjax.scores: each wrapper against a case worked out by hand, the checks it adds, and the
confusion image's shape."""

import math

import numpy as np
import pytest

from sftjax.scores.classes import classification_scores, confusion_image, confusion_text, report_text
from sftjax.scores.entities import entity_scores
from sftjax.scores.text import bleu, rouge_l, text_scores


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the mat": 5 tokens
    # of 6 in each, so P = R = F = 5/6; the exact pair scores 1, and the mean is (5/6 + 1) / 2.
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    assert rouge_l(["the cat sat on the mat", "a dog"], ["the cat is on the mat", "a dog"]) == pytest.approx(11 / 12)


def test_bleu_by_hand():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # Hypothesis "the cat sat on the mat" (c = 6 tokens), reference "the cat sat on the red mat" (r = 7).
    # Clipped n-gram precisions: 1-grams 6/6; 2-grams 4/5 ("the mat" misses); 3-grams 3/4 ("on the mat"
    # misses); 4-grams 2/3 ("sat on the mat" misses). No zero count, so smoothing does nothing.
    # Brevity penalty exp(1 - r/c) = exp(-1/6) since c < r. BLEU = 100 * BP * (1 * 4/5 * 3/4 * 2/3) ** (1/4).
    expected = 100 * math.exp(1 - 7 / 6) * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25  # 67.318...
    assert bleu(["the cat sat on the mat"], ["the cat sat on the red mat"]) == pytest.approx(expected)


def test_text_scores_keys_and_exact_match():
    scores = text_scores(["  yes\n", "no", "maybe"], ["yes", "no ", "never"])
    assert set(scores) == {"rouge_l", "bleu", "exact_match"}
    assert scores["exact_match"] == pytest.approx(2 / 3)  # stripped "yes" and "no" match, "maybe" does not


@pytest.mark.parametrize("fn", [rouge_l, bleu, text_scores])
def test_text_errors(fn):
    with pytest.raises(ValueError, match="pair one to one"):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no items"):
        fn([], [])


LABELS = ["pos", "neg", "neu"]
GOLD = ["pos", "pos", "neg", "neg", "neg", "neu", "neu"]
PRED = ["pos", "neg", "neg", "neg", "neg", "neu", "pos"]


def test_classification_by_hand():
    s = classification_scores(GOLD, PRED, LABELS)
    # Rows gold, columns predicted, in LABELS order: one pos read as neg, one neu read as pos.
    assert s["confusion"] == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    assert s["accuracy"] == pytest.approx(5 / 7)  # the diagonal: 1 + 3 + 1
    # pos: TP 1, FP 1 (the neu), FN 1 -> P 1/2, R 1/2, F 1/2.
    # neg: TP 3, FP 1 (the pos), FN 0 -> P 3/4, R 1, F 2 * 3/4 / (7/4) = 6/7.
    # neu: TP 1, FP 0, FN 1 -> P 1, R 1/2, F 2 * 1/2 / (3/2) = 2/3.
    expected = {"pos": (1 / 2, 1 / 2, 1 / 2, 2), "neg": (3 / 4, 1, 6 / 7, 3), "neu": (1, 1 / 2, 2 / 3, 2)}
    for label, (p, r, f, n) in expected.items():
        c = s["per_class"][label]
        assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((p, r, f))
        assert c["support"] == n
    assert s["macro_f1"] == pytest.approx((1 / 2 + 6 / 7 + 2 / 3) / 3)  # 85/126
    assert s["weighted_f1"] == pytest.approx((2 * 1 / 2 + 3 * 6 / 7 + 2 * 2 / 3) / 7)  # 103/147
    assert s["unlisted"] == 0


def test_prediction_outside_labels_counts_wrong():
    s = classification_scores(["pos", "neg"], ["pos", "I think negative"], ["pos", "neg"])
    assert s["accuracy"] == 0.5 and s["unlisted"] == 1
    assert s["per_class"]["neg"]["recall"] == 0.0 and s["per_class"]["pos"]["precision"] == 1.0
    assert s["confusion"] == [[1, 0], [0, 0]]  # the unlisted answer has no column
    assert "1 predictions named no label" in report_text(s, ["pos", "neg"])


def test_classification_errors():
    with pytest.raises(ValueError, match="pair one to one"):
        classification_scores(["pos"], ["pos", "neg"], LABELS)
    with pytest.raises(ValueError, match="no items"):
        classification_scores([], [], LABELS)
    with pytest.raises(ValueError, match="not in labels"):
        classification_scores(["pos", "other"], ["pos", "pos"], LABELS)
    with pytest.raises(ValueError, match="distinct"):
        classification_scores(["pos"], ["pos"], ["pos", "pos"])


def test_confusion_text_and_report():
    s = classification_scores(GOLD, PRED, LABELS)
    table = confusion_text(s["confusion"], LABELS).splitlines()
    assert table[0].split()[-3:] == LABELS
    assert [line.split() for line in table[1:]] == [["pos", "1", "1", "0"], ["neg", "0", "3", "0"], ["neu", "1", "0", "1"]]
    assert len({len(line) for line in table}) == 1  # fixed width
    report = report_text(s, LABELS)
    assert "0.8571" in report and "0.7143" in report and "0.6746" in report and "0.7007" in report


def test_confusion_image_grows_with_labels():
    small = confusion_image([[2, 1], [0, 3]], ["a", "b"])
    big = confusion_image(np.eye(5, dtype=int).tolist(), list("abcde"))
    for image in (small, big):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.min() < 100 < 250 < image.max()  # dark cells/text on white, not blank
    assert big.shape[0] > small.shape[0] and big.shape[1] > small.shape[1]
    with pytest.raises(ValueError, match="shape"):
        confusion_image([[1, 2]], ["a", "b"])


def test_entities_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"]]
    pred = [["B-PER", "B-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"]]
    s = entity_scores(gold, pred)
    # Gold entities: PER[0:2] and LOC[3] in sentence 0, LOC[0] and PER[2] in sentence 1: 4.
    # The prediction splits PER[0:2] into PER[0] and PER[1] (a boundary error, two wrong entities):
    # 5 predicted, 3 exactly right. P = 3/5, R = 3/4, F1 = 2 * 3/5 * 3/4 / (3/5 + 3/4) = 2/3.
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((3 / 5, 3 / 4, 2 / 3))
    # PER: 2 gold, 3 predicted, 1 right -> P 1/3, R 1/2, F1 2 * 1/6 / (5/6) = 2/5. LOC: all right.
    assert s["per_type"]["PER"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 2, "f1": 2 / 5, "support": 2})
    assert s["per_type"]["LOC"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2})
    assert set(s["per_type"]) == {"PER", "LOC"}
    assert "PER" in s["report"] and "0.6000" in s["report"]


def test_entity_errors():
    with pytest.raises(ValueError, match="sentence 1: 3 gold tags but 2 predicted"):
        entity_scores([["O"], ["B-PER", "O", "O"]], [["O"], ["B-PER", "O"]])
    with pytest.raises(ValueError, match="pair one to one"):
        entity_scores([["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="no items"):
        entity_scores([], [])
