"""The training batch stream: a grain pipeline per data shard, checkpointable.

Per shard, read top to bottom: examples of each source (this shard's slice) -> seeded shuffle,
reshuffled every epoch -> features (inputs, next-token labels, loss weights, source id) ->
mixture of sources by data.mixture weights -> pack into fixed rows (data.packing) or pad to a
length bucket -> batch -> prefetch. grain's mixing is a deterministic interleave, so every shard
picks the same bucket at the same step and the global batch always has one shape.

Global batch rows are shard 0's local batch, then shard 1's, ...; a process builds only its own
shards (process p of P owns shards p*S/P .. (p+1)*S/P - 1), so with data.num_shards fixed the
data order does not depend on the number of processes. The iterator state (grain's, per shard)
is saved in the Orbax step directory; restoring it continues with exactly the next batch.
"""

from __future__ import annotations

import functools
import json
import math

import grain
import numpy as np

from sftjax.data.tokens import TokenStore, features, packed_targets, targets_first
from sftjax.errors import UserError

FEATURES = ("inputs", "labels", "weights", "source")
PACK_BINS = 256  # rows filled at once by best-fit packing; more bins, less padding


def bucket_edges(lengths: np.ndarray, n_buckets: int, max_len: int) -> list[int]:
    """Up to `n_buckets` padded lengths (multiples of 8) at quantiles of the input lengths."""
    qs = np.quantile(lengths, np.arange(1, n_buckets + 1) / n_buckets)  # the last one is the longest
    return sorted({min(max_len, math.ceil(q / 8) * 8) for q in qs})


def _features(store: TokenStore, source: int, pad_to: int | None, pad_id: int, class_weights=None,
              head_index: bool = False):
    """Index -> per-example features; length n-1 (inputs and their next-token labels, or a task
    head's class labels, weighted by `class_weights` [num classes] if given). `head_index` adds
    "head", the example's target positions, for packing under a target budget."""

    def get(i):
        ids, tgt = store.example(int(i))
        n = len(ids) - 1
        out = {**features(ids, tgt, store.example_labels(int(i))), "source": np.full(n, source, np.int32)}
        if head_index:
            out["head"] = np.flatnonzero(out["weights"] > 0).astype(np.int32)
        if class_weights is not None:
            out["weights"] = out["weights"] * class_weights[out["labels"]]
        if pad_to is not None:
            out = {k: np.pad(v, (0, pad_to - n), constant_values=pad_id if k == "inputs" else 0)
                   for k, v in out.items()}
            out["valid"] = np.arange(pad_to) < n
        return out

    return get


def _stream(store: TokenStore, rows: np.ndarray, source: int, seed: int, pad_to, pad_id,
            class_weights=None, head_index: bool = False) -> grain.IterDataset:
    ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat(None)
    return ds.map(_features(store, source, pad_to, pad_id, class_weights, head_index)).to_iter_dataset()


def _mix(streams: list, weights: list[float]) -> grain.IterDataset:
    keep = [(s, w) for s, w in zip(streams, weights, strict=True) if w > 0]
    if len(keep) == 1:
        return keep[0][0]
    return grain.IterDataset.mix([s for s, _ in keep], [w for _, w in keep])


def _shard_rows(rows: np.ndarray, shard: int, num_shards: int) -> np.ndarray:
    """This shard's slice; a slice too small to have one example falls back to all rows."""
    mine = rows[shard::num_shards]
    return mine if len(mine) else rows


def _packed_row(row: dict) -> dict:
    seg = row["inputs_segment_ids"]
    out = {"input_ids": row["inputs"], "labels": row["labels"], "weights": row["weights"],
           "source": row["source"], "segment_ids": seg, "position_ids": row["inputs_positions"], "valid": seg > 0}
    return out if "head" not in row else packed_targets(out, row["head"], row["head_segment_ids"])


def _rename(batch: dict) -> dict:
    batch["input_ids"] = batch.pop("inputs")
    return batch


def shard_dataset(stores: list[TokenStore], weights: list[float], dcfg, shard: int, num_shards: int,
                  local_batch: int, pad_id: int, head_slots: int | None, class_weights=None) -> grain.IterDataset:
    """The batch stream of one data shard (see the module docstring)."""
    seed = dcfg.seed * 1000 + shard
    length = dcfg.max_length
    if dcfg.packing:
        # With head slots each example also brings its target positions ("head"), and the packer
        # fits them into `head_slots` per row as it fits the tokens into `length`.
        budget = {} if head_slots is None else {"head": head_slots}
        streams = [_stream(st, _shard_rows(np.arange(len(st)), shard, num_shards), s, seed + 97 * s, None, pad_id,
                           class_weights, bool(budget)) for s, st in enumerate(stores)]
        packed = grain.experimental.BestFitPackIterDataset(
            _mix(streams, weights), length_struct={**{k: length for k in FEATURES}, **budget},
            num_packing_bins=max(PACK_BINS, local_batch), seed=seed, shuffle_bins=True)
        return packed.map(_packed_row).batch(local_batch, batch_fn=_stack)
    all_lengths = np.concatenate([st.lengths - 1 for st in stores])
    edges = bucket_edges(all_lengths, dcfg.buckets, length)
    bucket_streams, bucket_weights = [], []
    for b, edge in enumerate(edges):
        lo = edges[b - 1] if b else 0
        streams, ws = [], []
        for s, st in enumerate(stores):
            rows = np.flatnonzero((st.lengths - 1 > lo) & (st.lengths - 1 <= edge))
            share = len(rows) / len(st) * weights[s]
            if share == 0:
                continue
            streams.append(_stream(st, _shard_rows(rows, shard, num_shards), s, seed + 97 * s + 7919 * b, edge, pad_id,
                                   class_weights))
            ws.append(share)
        if not streams:
            continue
        ds = _mix(streams, ws).batch(local_batch, batch_fn=_stack).map(_rename)
        if head_slots is not None and head_slots <= edge // 2:
            ds = ds.map(functools.partial(targets_first, slots=head_slots))
        bucket_streams.append(ds)
        bucket_weights.append(sum(ws))
    return _mix(bucket_streams, bucket_weights)


def _stack(rows: list[dict]) -> dict:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class ShardedLoader:
    """Local batches of this process's shards, concatenated; grain-checkpointable.

    `get_state`/`set_state` speak bytes, which is what `grain.checkpoint.CheckpointHandler`
    expects from an iterator that is not a single grain DatasetIterator.
    """

    def __init__(self, datasets: list[grain.IterDataset], shards: list[int], prefetch: int = 2):
        self.shards = shards
        self.iterators = [iter(grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch))
                          if prefetch else iter(ds) for ds in datasets]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> bytes:
        return json.dumps({"shards": self.shards, "iterators": [it.get_state() for it in self.iterators]}).encode()

    def set_state(self, state: bytes) -> None:
        saved = json.loads(state)
        if saved["shards"] != self.shards:
            raise UserError(f"data.num_shards: the checkpoint's data iterators are for shards {saved['shards']} but "
                            f"this process now owns shards {self.shards}; resume with the same data.num_shards "
                            "and number of processes")
        try:
            for it, st in zip(self.iterators, saved["iterators"], strict=True):
                it.set_state(st)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise UserError(f"data: the checkpoint's data position does not fit the current data config ({e!r}); "
                            "data.* settings that shape batches (sources, packing, buckets, max_length, batch "
                            "size) must stay as they were when resuming, or start a new workdir") from None

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; prefetch restarts by itself."""

    def close(self) -> None:
        """Stop the prefetch threads (safe to call twice)."""
        for it in self.iterators:
            if hasattr(it, "close"):
                it.close()
        self.iterators = []


def make_loader(stores: list[TokenStore], weights: list[float], dcfg, global_batch: int, pad_id: int,
                head_slots: int | None, process_index: int = 0, process_count: int = 1, prefetch: int = 2,
                class_weights=None) -> ShardedLoader:
    """The loader for this process: data.num_shards (0: one per process) split over the processes;
    `class_weights` [num classes] scale a task head's loss per class."""
    num_shards = dcfg.num_shards or process_count
    if num_shards % process_count:
        raise UserError(f"data.num_shards: {num_shards} is not a multiple of the {process_count} processes")
    if global_batch % num_shards:
        raise UserError(f"train.batch_size: {global_batch} is not divisible by data.num_shards={num_shards}")
    per = num_shards // process_count
    shards = list(range(process_index * per, (process_index + 1) * per))
    local = global_batch // num_shards
    datasets = [shard_dataset(stores, weights, dcfg, s, num_shards, local, pad_id, head_slots, class_weights)
                for s in shards]
    return ShardedLoader(datasets, shards, prefetch)
