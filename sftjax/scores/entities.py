"""Entity-level scores of BIO tag sequences (named entities, slots), as seqeval computes them."""

from __future__ import annotations

from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from sftjax.scores.checks import paired


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Micro-averaged entity precision, recall and F1 (seqeval's default, conlleval-compatible mode:
    an entity counts only with its exact span and type), and the same per entity type.

    seqeval joins the sentences before scoring, so one sentence with a tag too many or too few would
    shift every later one; each pair is checked here first.

    Returns:
        {"precision", "recall", "f1": float,
         "per_type": {type: {"precision", "recall", "f1": float, "support": int}},
         "report": seqeval's printable classification report (4 digits)}.
        Scores with nothing to divide by are 0 (zero_division=0), not a warning.
    """
    paired(gold, pred, ("gold sentences", "predicted sentences"))
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted tags")
    table = classification_report(gold, pred, output_dict=True, zero_division=0)
    types = sorted(k for k in table if not k.endswith(" avg"))
    return {
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "per_type": {t: {"precision": float(table[t]["precision"]), "recall": float(table[t]["recall"]),
                         "f1": float(table[t]["f1-score"]), "support": int(table[t]["support"])} for t in types},
        "report": classification_report(gold, pred, digits=4, zero_division=0),
    }
