"""From data.* config to what training consumes: sources -> filters -> split -> tokens -> loader.

`load` streams every source of the mixture (data.train alone is a mixture of one) record by
record through the quality and dedup filters, then the train/eval split (after dedup, so a
duplicate cannot leak across it), then the chat template and loss mask, and reports what each
stage removed. Only token ids and masks are kept, so a large file never sits in memory as text.
`Examples` holds the held-out set at one fixed shape for evaluation; training batches come from
`loader.py`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from sftjax.data import filters, templates
from sftjax.data.recipes import load_recipe
from sftjax.data.records import Record, read_records
from sftjax.data.tokens import StoreBuilder, TokenStore, encode_records, features, targets_first
from sftjax.errors import UserError

log = logging.getLogger("sftjax")
FORGETTING_EXAMPLES = 256  # general-data records measured by data.forgetting


@dataclass
class Examples:
    """Examples padded to one shape [N, L+1] (evaluation, tests)."""

    ids: np.ndarray  # [N, L+1] int32, pad-filled
    targets: np.ndarray  # [N, L+1] bool, loss mask
    valid: np.ndarray  # [N, L+1] bool, real (non-pad) tokens
    source: np.ndarray | None = None  # [N] int32, index into the mixture's sources
    # Target slots per row when targets are sparse (see `Llama`'s head_positions); None: all L.
    head_slots: int | None = None
    labels: np.ndarray | None = None  # [N, L+1] int32: a task head's class ids (-1: none)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows) -> dict[str, np.ndarray]:
        """Model inputs and next-token targets for the given example rows."""
        feats = features(self.ids[rows], self.targets[rows], None if self.labels is None else self.labels[rows])
        batch = {"input_ids": feats["inputs"], "valid": self.valid[rows][:, :-1], "labels": feats["labels"],
                 "weights": feats["weights"]}
        if self.source is not None:
            batch["source"] = np.broadcast_to(self.source[rows][:, None], batch["labels"].shape).astype(np.int32)
        return batch if self.head_slots is None else targets_first(batch, self.head_slots)


def padded(store: TokenStore, length: int, pad_id: int, source: np.ndarray | None = None) -> Examples:
    """A store as fixed-shape arrays of `length` tokens, with head slots when targets are sparse."""
    n = len(store)
    ids = np.full((n, length), pad_id, np.int32)
    tgt = np.zeros((n, length), bool)
    for i in range(n):
        x, m = store.example(i)
        ids[i, : len(x)], tgt[i, : len(x)] = x, m
    ex = Examples(ids, tgt, np.arange(length)[None, :] < store.lengths[:, None], source)
    ex.head_slots = head_slots([store], length - 1)
    if store.labels is not None:
        ex.labels = np.full((n, length), -1, np.int32)
        for i in range(n):
            lab = store.example_labels(i)
            ex.labels[i, : len(lab)] = lab
    return ex


def head_slots(stores: list[TokenStore], length: int, packing: bool = False) -> int | None:
    """Target slots per row, if at most half of `length` (else None: the head at every position):
    the most target tokens of any example, rounded up to 8. A packed row holds several examples,
    so with `packing` also room for twice the targets of an average row of `length` tokens: the
    packer then seldom closes a row for its targets before its tokens."""
    most = max(int(np.add.reduceat(st.targets, st.offsets[:-1]).max()) for st in stores)
    if packing:
        share = sum(int(st.targets.sum()) for st in stores) / sum(len(st.targets) for st in stores)
        most = max(most, math.ceil(2 * share * length))
    slots = -(-most // 8) * 8
    return slots if slots <= length // 2 else None


def sources(cfg) -> list[tuple[str, float]]:
    """(source, weight) pairs from data.mixture, or data.train with weight 1."""
    d = cfg.data
    if d.mixture:
        if d.train:
            raise UserError("data.train: set either data.train or data.mixture, not both")
        out = []
        for i, item in enumerate(d.mixture):
            ok = isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) \
                and isinstance(item[1], (int, float)) and item[1] > 0
            if not ok:
                raise UserError(f"data.mixture[{i}]: expected (source, positive weight), got {item!r}")
            out.append((item[0], float(item[1])))
        return out
    if not d.train:
        raise UserError("data.train: not set; give a data file, a folder or recipe:NAME (e.g. recipe:trec)")
    return [(d.train, 1.0)]


def read(src: str, dcfg) -> tuple[Iterable[Record], list[Record] | None]:
    """(records, held-out records) of one source; only recipes bring their own held-out split."""
    if src.startswith("recipe:"):
        return load_recipe(src.removeprefix("recipe:"))
    return read_records(src, dcfg.format, tuple(dcfg.labels), dcfg.instruction), None


def held_out(record: Record, fraction: float, seed: int) -> bool:
    """Whether a record is in the held-out `fraction`: a hash of (seed, its normalised content),
    so the split is decided record by record while streaming, is the same on every run and
    machine wherever the file lives, and copies of a record always land on the same side."""
    h = hashlib.blake2b(f"{seed}:{filters.normalise(record)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < fraction


@dataclass
class Prepared:
    names: list[str]  # one per source
    weights: list[float]
    train: list[TokenStore]  # one per source
    eval: Examples | None
    eval_records: list[Record]
    report: dict
    forgetting: Examples | None = None  # data.forgetting's examples (general data), if set


def load(cfg, tokenizer, head=None) -> Prepared:
    """Every stage of the data path up to the loader, with a per-source report of what it removed.

    Held-out records: a recipe's own split, else data.eval, else a data.eval_fraction of each
    source; at most data.max_eval_examples of each source are kept for evaluation. With a task
    `head` (`data/labels.py`) examples carry class labels instead of next-token targets.
    """
    d = cfg.data
    if head is None:  # task heads read the raw text: no chat template
        templates.resolve(tokenizer, d.chat_template, model=cfg.model.path)
    names, weights, stores, eval_recs, eval_src, report = [], [], [], [], [], {}
    for s, (src, weight) in enumerate(sources(cfg)):
        recs, held = read(src, d)
        filt = filters.RecordFilter(d.dedup, d.near_dup_threshold, tuple(d.quality), src)
        builder = StoreBuilder(tokenizer, d, src, head)
        mine, n_read, n_held = [], 0, 0
        for rec in recs:
            n_read += 1
            if filt.reason(rec) is not None:
                continue
            if held is None and not d.eval and held_out(rec, d.eval_fraction, d.seed):
                n_held += 1
                if len(mine) < d.max_eval_examples:
                    mine.append(rec)
                continue
            builder.add(rec)
        filt.log()
        if n_read == sum(filt.counts().values()):
            raise UserError(f"{src}: no records left after filtering ({filt.counts()}); relax data.quality / data.dedup")
        if held:
            mine, n_held = held[: d.max_eval_examples], len(held)
        store, dropped = builder.finish()
        names.append(src)
        weights.append(weight)
        stores.append(store)
        eval_recs += mine
        eval_src += [s] * len(mine)
        report[src] = {"records": n_read, "removed_by_filters": filt.counts(), "held_out": n_held,
                       "removed_by_length": dropped, "examples": len(store), "tokens": int(len(store.ids)),
                       "trained_token_fraction": round(store.target_fraction(), 4)}
    if d.eval:
        eval_recs = list(read_records(d.eval, d.format, tuple(d.labels), d.instruction))[: d.max_eval_examples]
        eval_src = [0] * len(eval_recs)
    eval_ex = None
    if eval_recs:
        store, _ = encode_records(eval_recs, tokenizer, d, "eval data", head)
        kept = set(store.wheres)
        src_of = np.asarray([s for r, s in zip(eval_recs, eval_src, strict=True) if r.where in kept], np.int32)
        eval_ex = padded(store, d.max_length + 1, tokenizer.pad_token_id, src_of)
    elif d.eval_fraction > 0:
        log.warning("no held-out records (data.eval_fraction=%s of a small source); evaluation is skipped",
                    d.eval_fraction)
    return Prepared(names, weights, stores, eval_ex, eval_recs, report, general(cfg, tokenizer, head))


def general(cfg, tokenizer, head=None) -> Examples | None:
    """data.forgetting's held-out examples (the first FORGETTING_EXAMPLES of a recipe's split, else
    of the source's records), as next-token examples; None when unset or with a task head (which has
    no language-model head to measure). A fixed count, so runs with different data.max_eval_examples
    measure the same conversations (at the same data.max_length)."""
    d = cfg.data
    if not d.forgetting or head is not None:
        return None
    recs, held = read(d.forgetting, d)
    recs = held if held else list(itertools.islice(recs, FORGETTING_EXAMPLES))
    store, _ = encode_records(recs[:FORGETTING_EXAMPLES], tokenizer, d, f"data.forgetting {d.forgetting}")
    return padded(store, d.max_length + 1, tokenizer.pad_token_id)
