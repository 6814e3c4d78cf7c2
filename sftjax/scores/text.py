"""Scores of generated text against one reference each: ROUGE-L, corpus BLEU and exact match."""

from __future__ import annotations

import sacrebleu
from rouge_score import rouge_scorer

from sftjax.scores.checks import paired


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean over pairs of the ROUGE-L F-measure (longest common subsequence of tokens), in [0, 1].

    rouge-score's own tokenizer lowercases and keeps only [a-z0-9] runs, without stemming
    (`use_stemmer=False`), so the value does not depend on an NLTK stemmer version. An empty
    prediction or reference scores 0 for its pair.
    """
    paired(predictions, references, ("predictions", "references"))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True))
    return total / len(predictions)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU on sacrebleu's 0-100 scale, with its defaults (13a tokenizer, 4-grams,
    exponential smoothing): n-gram counts are pooled over the corpus before the geometric mean and
    the brevity penalty, so this is not the mean of sentence BLEUs."""
    paired(predictions, references, ("predictions", "references"))
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference once surrounding whitespace is stripped."""
    paired(predictions, references, ("predictions", "references"))
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return hits / len(predictions)


def text_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """{"rouge_l": [0, 1], "bleu": [0, 100], "exact_match": [0, 1]} for one reference per prediction."""
    return {"rouge_l": rouge_l(predictions, references), "bleu": bleu(predictions, references),
            "exact_match": exact_match(predictions, references)}
