"""The one input check every score shares: two non-empty, equally long lists of paired items."""

from __future__ import annotations


def paired(first: list, second: list, names: tuple[str, str]) -> None:
    """Raise ValueError unless `first` and `second` are non-empty and of one length.

    Libraries differ here (sacrebleu raises, rouge-score has no corpus call, seqeval flattens and so
    misaligns silently), and a score over nothing or over shifted pairs is a wrong number, not a zero.
    """
    if not first or not second:
        raise ValueError(f"no items to score: {len(first)} {names[0]}, {len(second)} {names[1]}")
    if len(first) != len(second):
        raise ValueError(f"{len(first)} {names[0]} but {len(second)} {names[1]}: they must pair one to one")
