"""Test-only helpers: ways to drive the library that a real run does not need."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import grain
import numpy as np

from sftjax.data.pipeline import Examples, padded
from sftjax.data.records import Record, read_records
from sftjax.data.tokens import encode_records


def read_list(path: str, fmt: str = "auto") -> list[Record]:
    """All records of a source as a list."""
    return list(read_records(path, fmt))


def tokenize(records: list[Record], tokenizer, dcfg, name: str) -> Examples:
    """Records -> padded Examples of data.max_length + 1 tokens (no filters, no split)."""
    store, _ = encode_records(records, tokenizer, dcfg, name)
    return padded(store, dcfg.max_length + 1, tokenizer.pad_token_id)


def file_batches(cfg, tokenizer) -> Iterator[dict[str, np.ndarray]]:
    """Host batches of train.batch_size rows of data.train (a file; no filters or split) at one
    padded shape, in a seeded order reshuffled every epoch, for tests that drive the step directly
    rather than through the loader."""
    d = cfg.data
    ex = tokenize(list(read_records(d.train, d.format, tuple(d.labels), d.instruction)), tokenizer, d, d.train)
    assert len(ex) >= cfg.train.batch_size, (len(ex), cfg.train.batch_size)
    order = grain.MapDataset.range(len(ex)).shuffle(seed=d.seed).repeat(None).batch(cfg.train.batch_size,
                                                                                    drop_remainder=True)
    return (ex.batch(order[i]) for i in itertools.count())


def first_batch(setup, cfg) -> dict:
    """The first batch of `file_batches`, placed on the setup's mesh."""
    from sftjax.parallel.mesh import place_batch

    return place_batch(next(file_batches(cfg, setup.tokenizer)), setup.mesh)


def init_state(setup, cfg):
    """(state, optimizer, schedule) at step 0 for a config, as a run starts."""
    from sftjax.train.step import init_state as init

    return init(setup, cfg.optim, cfg.train.steps)


class CountingModel:
    """Wraps a model and counts how often it is traced: a jitted step that calls `apply` once per
    trace has compiled exactly `traces` times."""

    def __init__(self, model):
        self.model, self.traces = model, 0

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def base(self):
        return self.model.base

    def apply(self, *args, **kwargs):
        if kwargs.get("features") is None:  # the chunked loss's head calls are part of the same trace
            self.traces += 1
        return self.model.apply(*args, **kwargs)


def task_config(c, kind: str):
    """`c` (a tiny config) set up for a task head on the toy data: classification of
    tests/data/classes.jsonl (pos / neg) or tagging of tests/data/ner.jsonl (PER, LOC)."""
    data = os.path.join(os.path.dirname(__file__), "data")
    c.task.type = kind
    if kind == "classification":
        c.data.train, c.data.labels = os.path.join(data, "classes.jsonl"), ("pos", "neg")
    else:
        c.data.train, c.data.labels = os.path.join(data, "ner.jsonl"), ("PER", "LOC")
    c.data.max_length = 32
    return c
