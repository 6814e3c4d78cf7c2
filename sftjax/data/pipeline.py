"""From data.* config to what training consumes: sources -> filters -> split -> tokens -> loader.

`prepare` reads every source of the mixture (data.train alone is a mixture of one), applies
the quality and dedup filters before the train/eval split (so a duplicate cannot leak across
it), tokenises with the loss mask, and reports what each stage removed. `Examples` holds the
held-out set at one fixed shape for evaluation; training batches come from `loader.py`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import grain
import numpy as np

from sftjax.data import filters, templates
from sftjax.data.recipes import load_recipe
from sftjax.data.records import Record, read_records
from sftjax.data.tokens import TokenStore, encode_records
from sftjax.errors import UserError

log = logging.getLogger("sftjax")


@dataclass
class Examples:
    """Examples padded to one shape [N, L+1] (evaluation, tests)."""

    ids: np.ndarray  # [N, L+1] int32, pad-filled
    targets: np.ndarray  # [N, L+1] bool, loss mask
    valid: np.ndarray  # [N, L+1] bool, real (non-pad) tokens
    source: np.ndarray | None = None  # [N] int32, index into the mixture's sources
    # Target slots per row when targets are sparse (see `Llama`'s head_positions); None: all L.
    head_slots: int | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows) -> dict[str, np.ndarray]:
        """Model inputs and next-token targets for the given example rows."""
        ids, tgt, valid = self.ids[rows], self.targets[rows], self.valid[rows]
        batch = {"input_ids": ids[:, :-1], "valid": valid[:, :-1], "labels": ids[:, 1:],
                 "weights": tgt[:, 1:].astype(np.float32)}
        if self.source is not None:
            batch["source"] = np.broadcast_to(self.source[rows][:, None], batch["labels"].shape).astype(np.int32)
        if self.head_slots is not None:
            # Input positions whose next token is a target, first; stable so order is kept.
            pos = np.argsort(~tgt[:, 1:], axis=1, kind="stable")[:, : self.head_slots].astype(np.int32)
            batch["head_positions"] = pos
            for k in ("labels", "weights", "source"):
                if k in batch:
                    batch[k] = np.take_along_axis(batch[k], pos, 1)
        return batch


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
    return ex


def head_slots(stores: list[TokenStore], length: int) -> int | None:
    """Most target tokens of any example, rounded up to 8, if at most half of `length`."""
    most = max(int(np.add.reduceat(st.targets, st.offsets[:-1]).max()) for st in stores)
    slots = -(-most // 8) * 8
    return slots if slots <= length // 2 else None


def tokenize(records: list[Record], tokenizer, dcfg, name: str) -> Examples:
    """Records -> padded Examples of data.max_length + 1 tokens."""
    store, _ = encode_records(records, tokenizer, dcfg, name)
    return padded(store, dcfg.max_length + 1, tokenizer.pad_token_id)


def batch_order(n_examples: int, batch_size: int, seed: int) -> grain.MapDataset:
    """Row indices of batch `i` at `[i]`: seeded reshuffle every epoch, endless (tests, tools)."""
    if n_examples < batch_size:
        raise UserError(f"train.batch_size: {batch_size} is larger than the {n_examples} training examples")
    return grain.MapDataset.range(n_examples).shuffle(seed=seed).repeat(None).batch(batch_size, drop_remainder=True)


def sources(cfg) -> list[tuple[str, float]]:
    """(source, weight) pairs from data.mixture, or data.train with weight 1."""
    d = cfg.data
    if d.mixture:
        if d.train:
            raise UserError("data.train: set either data.train or data.mixture, not both")
        out = []
        for i, item in enumerate(d.mixture):
            if len(item) != 2 or not isinstance(item[0], str) or not float(item[1]) > 0:
                raise UserError(f"data.mixture[{i}]: expected (source, positive weight), got {item!r}")
            out.append((item[0], float(item[1])))
        return out
    if not d.train:
        raise UserError("data.train: not set; give a data file, a folder or recipe:NAME (e.g. recipe:trec)")
    return [(d.train, 1.0)]


def read(src: str, dcfg) -> tuple[list[Record], list[Record]]:
    """(records, held-out records) of one source; only recipes bring their own held-out split."""
    if src.startswith("recipe:"):
        return load_recipe(src.removeprefix("recipe:"))
    return list(read_records(src, dcfg.format, tuple(dcfg.labels), dcfg.instruction)), []


def split(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded random `fraction` held out (at least one record), the rest kept in order."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(records) * fraction))
    return [records[i] for i in sorted(order[n_eval:])], [records[i] for i in order[:n_eval]]


@dataclass
class Collected:
    """Records of every source after filtering and the train/eval split (no tokenizer needed)."""

    names: list[str]
    weights: list[float]
    train: list[list[Record]]  # one list per source
    eval: list[Record]
    eval_source: list[int]
    report: dict = field(default_factory=dict)


def collect(cfg) -> Collected:
    """Read, filter and split every source; bad data fails here, before the model is loaded."""
    d = cfg.data
    out = Collected([], [], [], [], [])
    for s, (src, weight) in enumerate(sources(cfg)):
        recs, held = read(src, d)
        kept, removed = filters.apply_filters(recs, d.dedup, d.near_dup_threshold, tuple(d.quality), src)
        if not kept:
            raise UserError(f"{src}: no records left after filtering ({removed}); relax data.quality / data.dedup")
        if not held and not d.eval:
            kept, held = split(kept, d.eval_fraction, d.seed)
        out.names.append(src)
        out.weights.append(weight)
        out.train.append(kept)
        out.eval += held
        out.eval_source += [s] * len(held)
        out.report[src] = {"records": len(recs), "removed_by_filters": removed, "held_out": len(held)}
    if d.eval:
        out.eval = list(read_records(d.eval, d.format, tuple(d.labels), d.instruction))
        out.eval_source = [0] * len(out.eval)
    out.eval, out.eval_source = out.eval[: d.max_eval_examples], out.eval_source[: d.max_eval_examples]
    return out


@dataclass
class Prepared:
    names: list[str]  # one per source
    weights: list[float]
    train: list[TokenStore]  # one per source
    eval: Examples | None
    eval_records: list[Record]
    report: dict


def prepare(collected: Collected, cfg, tokenizer) -> Prepared:
    """Tokenise with the loss mask (chat template per data.chat_template); report per source."""
    d = cfg.data
    templates.resolve(tokenizer, d.chat_template, model=cfg.model.path)
    stores, report = [], {k: dict(v) for k, v in collected.report.items()}
    for name, recs in zip(collected.names, collected.train, strict=True):
        store, dropped = encode_records(recs, tokenizer, d, name)
        stores.append(store)
        report[name].update(removed_by_length=dropped, examples=len(store), tokens=int(len(store.ids)),
                            trained_token_fraction=round(store.target_fraction(), 4))
    eval_ex = None
    if collected.eval:
        store, _ = encode_records(collected.eval, tokenizer, d, "eval data")
        kept = set(store.wheres)
        src = np.asarray([s for r, s in zip(collected.eval, collected.eval_source, strict=True) if r.where in kept],
                         np.int32)
        eval_ex = padded(store, d.max_length + 1, tokenizer.pad_token_id, src)
    return Prepared(collected.names, collected.weights, stores, eval_ex, collected.eval, report)
