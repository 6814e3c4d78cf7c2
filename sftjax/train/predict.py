"""A task head's predictions over padded examples, and the scores they earn (`sftjax.scores`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sftjax.data.labels import Head
from sftjax.parallel.mesh import place_batch
from sftjax.scores.classes import classification_scores
from sftjax.scores.entities import entity_scores


@dataclass
class Predictions:
    """Per example: gold class ids, predicted ids and their probabilities at its labelled tokens
    (one for classification, one per word for token classification)."""

    gold: list[np.ndarray]
    pred: list[np.ndarray]
    conf: list[np.ndarray]


def predict(setup, predict_step, examples, trainable, batch_size: int) -> Predictions:
    n = len(examples)
    out = Predictions([], [], [])
    for s in range(0, n, batch_size):
        rows = np.arange(s, s + batch_size)
        batch = examples.batch(np.minimum(rows, n - 1))
        pred, conf = predict_step(trainable, setup.frozen, place_batch(batch, setup.mesh, rules=setup.rules))
        pred, conf = np.asarray(pred), np.asarray(conf)
        for r in range(min(batch_size, n - s)):
            m = batch["weights"][r] > 0
            out.gold.append(batch["labels"][r][m])
            out.pred.append(pred[r][m])
            out.conf.append(conf[r][m])
    return out


def scores(head: Head, p: Predictions) -> dict:
    """classification: accuracy, macro/weighted F1, per class, confusion matrix; token
    classification: seqeval's entity-level precision/recall/F1, per type, and its report."""
    names = np.asarray(head.names)
    if head.kind == "classification":
        gold = [str(names[g[0]]) for g in p.gold]
        pred = [str(names[q[0]]) for q in p.pred]
        return classification_scores(gold, pred, list(head.names))
    return entity_scores([list(names[g]) for g in p.gold], [list(names[q]) for q in p.pred])


def headline(head: Head, s: dict) -> dict[str, float]:
    """The scalar scores logged at each evaluation (and usable as checkpoint.best_metric)."""
    keys = ("accuracy", "macro_f1", "weighted_f1") if head.kind == "classification" else ("f1", "precision", "recall")
    return {k: float(s[k]) for k in keys}
