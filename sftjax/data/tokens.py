"""Records -> token ids + loss masks, stored flat, with every drop counted and a mask audit.

Tokenising up front (one streaming pass, before step 1) gives exact counts of what truncation
and the length filters removed, the trained-token fraction, and the length distribution that
bucketing needs, before any compute is spent. The result is compact: one int32 and one bool
per token in two flat arrays plus an offset per example, so raw text is not kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from sftjax.data import labels
from sftjax.data.chat import encode
from sftjax.data.records import Record
from sftjax.errors import UserError

log = logging.getLogger("sftjax")


@dataclass
class TokenStore:
    ids: np.ndarray  # int32 [total tokens]
    targets: np.ndarray  # bool [total tokens]: loss mask
    offsets: np.ndarray  # int64 [n + 1]: example i is ids[offsets[i]:offsets[i + 1]]
    wheres: list[str]  # record of each example, for inspection and error messages
    labels: np.ndarray | None = None  # int32 [total tokens]: class ids for a task head (-1: none)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.targets[a:b]

    def example_labels(self, i: int) -> np.ndarray | None:
        return None if self.labels is None else self.labels[self.offsets[i]:self.offsets[i + 1]]

    def target_fraction(self) -> float:
        return float(self.targets.sum() / max(len(self.ids), 1))


def truncate(ids: np.ndarray, mask: np.ndarray, limit: int, how: str):
    """Cut to `limit` tokens: "right" keeps the start, "left" keeps the end, "drop" returns None."""
    if len(ids) <= limit:
        return ids, mask
    if how == "drop":
        return None
    if how == "left":
        return ids[-limit:], mask[-limit:]
    return ids[:limit], mask[:limit]


class StoreBuilder:
    """Encodes records one at a time into a TokenStore (so a source is tokenised as it is read).

    Each record is truncated to data.max_length (+1 for the shifted targets) and filtered by
    length; `finish` returns the store and the number of examples removed per reason. An example
    whose targets were all cut away is dropped and counted, or raises with
    data.on_no_targets="raise". A chat dataset whose loss mask covers every token raises: it
    means the template split failed.
    """

    def __init__(self, tokenizer, dcfg, name: str, head=None):
        self.tokenizer, self.d, self.name, self.head = tokenizer, dcfg, name, head
        self.ids: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.wheres: list[str] = []
        self.lengths = [0]
        self.removed = {"too_long": 0, "too_short": 0, "no_targets": 0}
        self.seen = self.chat = 0

    def add(self, rec: Record) -> bool:
        """Encode `rec`; True if it became an example, False if it was removed (and counted)."""
        d = self.d
        self.seen += 1
        if self.head is not None:
            cut = labels.encode(self.tokenizer, rec, self.head, d.max_length, d.truncation)
        else:
            self.chat += rec.text is None
            cut = truncate(*encode(self.tokenizer, rec, d.loss_on), d.max_length + 1, d.truncation)
        if cut is None:
            self.removed["too_long"] += 1
            return False
        x, m = cut[:2]
        if len(x) < max(d.min_tokens, 2):
            self.removed["too_short"] += 1
            return False
        # Next-token targets: the first token is never one (nothing precedes it); head labels: the
        # last token (the appended pad) never is.
        if not (m[:-1] if self.head is not None else m[1:]).any():
            if d.on_no_targets == "raise":
                raise UserError(f"{rec.where}: no target token left after truncation to data.max_length="
                                f"{d.max_length} ({len(x)} tokens); raise data.max_length or set "
                                "data.on_no_targets=drop")
            self.removed["no_targets"] += 1
            return False
        self.ids.append(x)
        self.targets.append(m)
        if self.head is not None:
            self.labels.append(cut[2])
        self.wheres.append(rec.where)
        self.lengths.append(len(x))
        return True

    def finish(self) -> tuple[TokenStore, dict[str, int]]:
        d, name = self.d, self.name
        for reason, n in self.removed.items():
            if n:
                log.warning("%s: removed %d of %d examples: %s (data.max_length=%d, data.truncation=%s, "
                            "data.min_tokens=%d)", name, n, self.seen, reason.replace("_", " "), d.max_length,
                            d.truncation, d.min_tokens)
        if not self.ids:
            raise UserError(f"{name}: no usable examples left of {self.seen} after truncation and length filters "
                            f"({', '.join(f'{k}={v}' for k, v in self.removed.items() if v) or 'no records'}); "
                            "check data.max_length, data.min_tokens and data.truncation")
        store = TokenStore(np.concatenate(self.ids).astype(np.int32), np.concatenate(self.targets),
                           np.cumsum(self.lengths, dtype=np.int64), self.wheres,
                           np.concatenate(self.labels) if self.labels else None)
        if self.chat and d.loss_on != "all" and store.targets.all():
            raise UserError(f"{name}: the loss mask covers every token of every chat example, so the chat template "
                            "was not split into turns; check data.chat_template (or set data.loss_on=all on purpose)")
        log.info("%s: %d examples, %d tokens, %.1f%% of tokens trained (%s)", name, len(store), len(store.ids),
                 100 * store.target_fraction(), f"data.loss_on={d.loss_on}" if self.head is None else "labelled tokens")
        return store, dict(self.removed)


def encode_records(records, tokenizer, dcfg, name: str, head=None) -> tuple[TokenStore, dict[str, int]]:
    """All of `records` through a StoreBuilder."""
    builder = StoreBuilder(tokenizer, dcfg, name, head)
    for rec in records:
        builder.add(rec)
    return builder.finish()


def next_token(ids: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """The one definition of the label shift: position t reads token t and predicts token t+1,
    whose loss counts if t+1 is a target. Works on one example [L] or a batch [B, L]."""
    return {"inputs": ids[..., :-1], "labels": ids[..., 1:], "weights": targets[..., 1:].astype(np.float32)}


def features(ids: np.ndarray, targets: np.ndarray, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """`next_token`, or with class `labels` (task heads, see `data/labels.py`) no shift: position t
    reads token t and is scored against labels[t] (the last token is the pad that `labels.encode`
    appended, so every real token keeps its place)."""
    if labels is None:
        return next_token(ids, targets)
    return {"inputs": ids[..., :-1], "labels": np.maximum(labels[..., :-1], 0),
            "weights": targets[..., :-1].astype(np.float32)}


def targets_first(batch: dict[str, np.ndarray], slots: int) -> dict[str, np.ndarray]:
    """Gather each row's target positions first (stable, so their order is kept) into `slots`
    head positions: the model then runs its vocabulary head only there (`Llama`'s head_positions),
    and the per-token labels, weights and sources follow."""
    return _at_slots(batch, np.argsort(batch["weights"] == 0, axis=1, kind="stable")[:, :slots].astype(np.int32))


def _at_slots(batch: dict[str, np.ndarray], pos: np.ndarray) -> dict[str, np.ndarray]:
    """`pos` [..., slots] as the head positions, with the per-token labels, weights and sources
    gathered there (along the last axis: a batch or one row)."""
    batch["head_positions"] = pos
    for k in ("labels", "weights", "source"):
        if k in batch:
            batch[k] = np.take_along_axis(batch[k], pos, -1)
    return batch


def packed_targets(row: dict[str, np.ndarray], head: np.ndarray, head_segments: np.ndarray) -> dict[str, np.ndarray]:
    """`targets_first` for one packed row: `head` holds each packed example's target positions
    (counted from its own start) and `head_segments` its segment id (0: an empty slot). Slots
    become row positions; empty slots point at position 0 with weight 0."""
    seg = row["segment_ids"]
    ids, first = np.unique(seg, return_index=True)
    start = np.zeros(int(ids.max()) + 1, np.int64)
    start[ids] = first
    used = head_segments > 0
    row = _at_slots(row, np.where(used, head + start[head_segments], 0).astype(np.int32))
    row["weights"] = np.where(used, row["weights"], 0).astype(row["weights"].dtype)
    return row
