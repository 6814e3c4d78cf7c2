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

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.targets[a:b]

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


def encode_records(records: list[Record], tokenizer, dcfg, name: str) -> tuple[TokenStore, dict[str, int]]:
    """Encode, truncate to data.max_length (+1 for the shifted targets) and filter by length.

    Returns the store and the number of examples removed per reason. An example whose targets
    were all cut away is dropped and counted, or raises with data.on_no_targets="raise".
    A chat dataset whose loss mask covers every token raises: it means the template split failed.
    """
    limit = dcfg.max_length + 1
    ids_parts, tgt_parts, wheres, lengths = [], [], [], [0]
    removed = {"too_long": 0, "too_short": 0, "no_targets": 0}
    chat = 0
    for rec in records:
        x, m = encode(tokenizer, rec, dcfg.loss_on)
        chat += rec.text is None
        cut = truncate(x, m, limit, dcfg.truncation)
        if cut is None:
            removed["too_long"] += 1
            continue
        x, m = cut
        if len(x) < max(dcfg.min_tokens, 2):
            removed["too_short"] += 1
            continue
        if not m[1:].any():  # the first token is never a target: nothing precedes it
            if dcfg.on_no_targets == "raise":
                raise UserError(f"{rec.where}: no target token left after truncation to data.max_length="
                                f"{dcfg.max_length} ({len(x)} tokens); raise data.max_length or set "
                                "data.on_no_targets=drop")
            removed["no_targets"] += 1
            continue
        ids_parts.append(x)
        tgt_parts.append(m)
        wheres.append(rec.where)
        lengths.append(len(x))
    for reason, n in removed.items():
        if n:
            log.warning("%s: removed %d of %d examples: %s (data.max_length=%d, data.truncation=%s, "
                        "data.min_tokens=%d)", name, n, len(records), reason.replace("_", " "), dcfg.max_length,
                        dcfg.truncation, dcfg.min_tokens)
    if not ids_parts:
        raise UserError(f"{name}: no usable examples left of {len(records)} after truncation and length filters "
                        f"({', '.join(f'{k}={v}' for k, v in removed.items() if v)}); check data.max_length, "
                        "data.min_tokens and data.truncation")
    store = TokenStore(np.concatenate(ids_parts).astype(np.int32), np.concatenate(tgt_parts),
                       np.cumsum(lengths, dtype=np.int64), wheres)
    frac = store.target_fraction()
    if chat and dcfg.loss_on != "all" and store.targets.all():
        raise UserError(f"{name}: the loss mask covers every token of every chat example, so the chat template "
                        "was not split into turns; check data.chat_template (or set data.loss_on=all on purpose)")
    log.info("%s: %d examples, %d tokens, %.1f%% of tokens trained (data.loss_on=%s)", name, len(store),
             len(store.ids), 100 * frac, dcfg.loss_on)
    return store, removed
