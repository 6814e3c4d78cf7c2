"""Records -> fixed-shape token arrays -> a grain dataset of global batches.

Every example is padded to `max_length + 1` tokens (inputs are the first `max_length`, targets
the last `max_length`), so the train step compiles exactly once. The batch order is a grain
`MapDataset` (seeded shuffle per epoch, repeat, batch): batch `i` is a pure function of the seed
and `i`, so a resumed run reads exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import grain
import numpy as np

from sftjax.data.chat import encode
from sftjax.data.recipes import load_recipe
from sftjax.data.records import Record, read_jsonl
from sftjax.errors import UserError

log = logging.getLogger("sftjax")


@dataclass
class Examples:
    ids: np.ndarray  # [N, L+1] int32, pad-filled
    targets: np.ndarray  # [N, L+1] bool, loss mask (assistant tokens)
    valid: np.ndarray  # [N, L+1] bool, real (non-pad) tokens
    # Target slots per row when targets are sparse (see `Llama`'s head_positions); None: all L.
    head_slots: int | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows) -> dict[str, np.ndarray]:
        """Model inputs and next-token targets for the given example rows."""
        ids, tgt, valid = self.ids[rows], self.targets[rows], self.valid[rows]
        batch = {"input_ids": ids[:, :-1], "valid": valid[:, :-1], "labels": ids[:, 1:],
                 "weights": tgt[:, 1:].astype(np.float32)}
        if self.head_slots is not None:
            # Input positions whose next token is a target, first; stable so order is kept.
            pos = np.argsort(~tgt[:, 1:], axis=1, kind="stable")[:, : self.head_slots].astype(np.int32)
            batch["positions"] = pos
            batch["labels"] = np.take_along_axis(batch["labels"], pos, 1)
            batch["weights"] = np.take_along_axis(batch["weights"], pos, 1)
        return batch


def load_records(cfg) -> tuple[list[Record], list[Record]]:
    """(train, eval) records from data.train / data.eval / data.eval_fraction."""
    src = cfg.data.train
    if not src:
        raise UserError("data.train: not set; give a JSONL file or recipe:NAME (e.g. recipe:trec)")
    if src.startswith("recipe:"):
        train, held = load_recipe(src.removeprefix("recipe:"))
    else:
        train = read_jsonl(src, cfg.data.format)
        held = []
    if cfg.data.eval:
        held = read_jsonl(cfg.data.eval, cfg.data.format)
    elif not held and cfg.data.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(cfg.data.seed).shuffle(order)
        n_eval = max(1, int(len(train) * cfg.data.eval_fraction))
        held = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in sorted(order[n_eval:])]
    return train, held[: cfg.data.max_eval_examples]


def tokenize(records: list[Record], tokenizer, max_length: int, name: str) -> Examples:
    """Encode and pad; examples whose targets are all truncated away are dropped and counted."""
    n = max_length + 1
    pad = tokenizer.pad_token_id
    ids, tgts, valid, dropped = [], [], [], 0
    for rec in records:
        x, m = encode(tokenizer, rec)
        x, m = x[:n], m[:n]
        if not m[1:].any():
            dropped += 1
            continue
        k = len(x)
        ids.append(np.pad(x, (0, n - k), constant_values=pad))
        tgts.append(np.pad(m, (0, n - k)))
        valid.append(np.arange(n) < k)
    if dropped:
        log.warning("%s: dropped %d of %d examples with no target token left after truncation to "
                    "data.max_length=%d", name, dropped, len(records), max_length)
    if not ids:
        raise UserError(f"{name}: no usable examples (all {len(records)} lost their targets to "
                        f"truncation at data.max_length={max_length}; raise it)")
    ex = Examples(np.stack(ids), np.stack(tgts), np.stack(valid))
    most = int(ex.targets[:, 1:].sum(1).max())
    slots = -(-most // 8) * 8
    if slots <= max_length // 2:
        ex.head_slots = slots
    log.info("%s: %d examples, %.1f%% of tokens are real, %.1f%% of real tokens are targets", name, len(ex),
             100 * ex.valid.mean(), 100 * ex.targets.sum() / max(ex.valid.sum(), 1))
    return ex


def batch_order(n_examples: int, batch_size: int, seed: int) -> grain.MapDataset:
    """Row indices of global batch `i` at `[i]`: seeded reshuffle every epoch, endless."""
    if n_examples < batch_size:
        raise UserError(f"train.batch_size: {batch_size} is larger than the {n_examples} training examples")
    return grain.MapDataset.range(n_examples).shuffle(seed=seed).repeat(None).batch(batch_size, drop_remainder=True)
