"""Records -> token ids with a class id on chosen tokens, for task heads (task.type).

Classification puts the record's class on one token: the last real token for a decoder (what it
has read at that point is the whole text), the first ([CLS]) for an encoder, or any with mean
pooling (the model averages). Token classification puts each word's BIO tag id on the word's
first sub-token; the other sub-tokens and special tokens carry no label (-1) and no loss.

The ids end with one extra pad token so that the loader's "n tokens -> n-1 positions" convention
(made for next-token targets) keeps every real token: with labels, position t reads token t and
is scored against label t, no shift (`tokens.features`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sftjax.data.records import Record
from sftjax.errors import UserError


@dataclass(frozen=True)
class Head:
    """What a task head predicts: `names[i]` is class id i."""

    kind: str  # classification | token_classification
    names: tuple[str, ...]  # class names, or BIO tags (O, B-T, I-T for each type T)
    position: str  # classification: last | first | mean

    @property
    def types(self) -> tuple[str, ...]:
        """Entity types of a tagging head (its names without O and the B-/I- prefixes)."""
        return tuple(n[2:] for n in self.names if n.startswith("B-"))


def entity_types(labels) -> tuple[str, ...]:
    """data.labels for token classification, given as types (PER) or whole tags (B-PER), -> types."""
    out: list[str] = []
    for lab in map(str, labels):
        t = lab[2:] if lab[:2] in ("B-", "I-") else lab
        if t != "O" and t not in out:
            out.append(t)
    return tuple(out)


def head_for(cfg, encoder: bool) -> Head | None:
    """The task head of a config (None for causal_lm); `encoder`: the model reads both ways."""
    t = cfg.task
    if t.type == "causal_lm":
        return None
    if t.type == "token_classification":
        tags = ["O"] + [f"{p}-{typ}" for typ in entity_types(cfg.data.labels) for p in ("B", "I")]
        return Head(t.type, tuple(tags), "last")
    position = t.pooling if t.pooling != "auto" else ("first" if encoder else "last")
    if not encoder and position != "last":
        raise UserError(f"task.pooling={position}: a decoder's first tokens have not read the text; use last "
                        "(or auto)")
    return Head(t.type, tuple(map(str, cfg.data.labels)), position)


def class_text(rec: Record) -> str:
    """The text a classification head reads: the record's last user turn (its label must be set)."""
    if rec.label is None:
        raise UserError(f"{rec.where}: task.type=classification needs a label on every record (text, label); "
                        "this record has none")
    return next(m["content"] for m in reversed(rec.messages) if m["role"] == "user")


def encode(tokenizer, rec: Record, head: Head, max_length: int, truncation: str):
    """(ids, targets, labels) of one record for `head`, or None when data.truncation=drop and it is
    too long. ids end with one pad token; labels are class ids, -1 where there is none."""
    if head.kind == "classification":
        text = class_text(rec)
        if rec.label not in head.names:
            raise UserError(f"{rec.where}: label {rec.label!r} is not in data.labels ({', '.join(head.names)})")
        ids = np.asarray(tokenizer(text)["input_ids"], np.int32)
        if len(ids) > max_length:
            if truncation == "drop":
                return None
            ids = ids[-max_length:] if truncation == "left" else ids[:max_length]
        labels = np.full(len(ids) + 1, -1, np.int32)
        labels[0 if head.position == "first" else len(ids) - 1] = head.names.index(rec.label)
    else:
        if rec.tokens is None:
            raise UserError(f"{rec.where}: task.type=token_classification needs tokens and tags on every record; "
                            "this record has none")
        words = [w if i == 0 else " " + w for i, w in enumerate(rec.tokens)]
        enc = tokenizer(words, is_split_into_words=True)
        ids = np.asarray(enc["input_ids"], np.int32)
        labels = np.full(len(ids) + 1, -1, np.int32)
        seen = set()
        for pos, word in enumerate(enc.word_ids()):
            if word is not None and word not in seen:
                seen.add(word)
                labels[pos] = _tag_id(head, rec.tags[word], rec.where)
        if len(ids) > max_length:
            if truncation == "drop":
                return None
            keep = slice(len(ids) - max_length, None) if truncation == "left" else slice(0, max_length)
            ids, labels = ids[keep], np.append(labels[:-1][keep], -1)
    ids = np.append(ids, tokenizer.pad_token_id).astype(np.int32)
    return ids, labels >= 0, labels


def _tag_id(head: Head, tag: str, where: str) -> int:
    if tag in head.names:
        return head.names.index(tag)
    raise UserError(f"{where}: tag {tag!r} is not a tag of data.labels' types ({', '.join(head.types)})")


def class_weights(cfg, head: Head, labels: np.ndarray) -> np.ndarray | None:
    """Per-class loss weights: task.class_weights, or with task.balance_classes n / (k * count_c)
    over the training labels (sklearn's "balanced"; a class never seen gets weight 1)."""
    if cfg.task.class_weights:
        return np.asarray(cfg.task.class_weights, np.float32)
    if not cfg.task.balance_classes:
        return None
    counts = np.bincount(labels[labels >= 0], minlength=len(head.names)).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (len(head.names) * np.maximum(counts, 1)), 1.0)
    return w.astype(np.float32)
