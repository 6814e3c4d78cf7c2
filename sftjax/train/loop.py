"""The training loop: data -> state -> steps, with periodic actions as hooks; resumes by itself.

Running the same command again in the same workdir continues from the latest checkpoint; the data
loader's position is saved in the same checkpoint (see data/loader.py), so the resumed run sees
exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import jax

from sftjax.build import Setup, build
from sftjax.data import pipeline
from sftjax.data.loader import make_loader
from sftjax.io.load import load_tokenizer
from sftjax.parallel import flops
from sftjax.parallel.mesh import RULES, check_batch, place_batch
from sftjax.train import hooks as H
from sftjax.train import workdir as W
from sftjax.train.checkpoint import Checkpointer
from sftjax.train.evaluate import evaluate, sample_conversations
from sftjax.train.metrics import Writer
from sftjax.train.step import init_state, make_eval_step, make_train_step

log = logging.getLogger("sftjax")


class StopRequest:
    """SIGTERM/SIGINT set a flag instead of killing the process, so the loop can finish the step,
    checkpoint and exit cleanly (preemptible machines, SLURM time limits, Ctrl-C). A second
    signal stops at once."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Interrupted(Exception):
    """Training stopped on a signal after the hooks saved what they keep (a checkpoint)."""


@dataclass
class Loop:
    """Steps `start`..`steps` of `step_fn` over `loader`'s batches, calling every hook around them."""

    step_fn: Any
    frozen: Any
    loader: Any
    mesh: Any
    steps: int
    hooks: list[H.Hook]
    start: int = 0
    results: dict = field(default_factory=dict)  # hooks record what a run reports here
    rules: dict = field(default_factory=lambda: dict(RULES))  # mesh.rules: how batches split over the mesh
    _stop: StopRequest | None = None

    @property
    def stopping(self) -> bool:
        """A signal asked to stop: hooks save what they must; the loop ends after this step."""
        return self._stop is not None and self._stop.signal is not None

    def run(self, state):
        try:
            for h in self.hooks:
                h.start(self, state)
            with StopRequest() as stop:
                self._stop = stop
                for step in range(self.start, self.steps):
                    batch = next(self.loader)
                    placed = place_batch(batch, self.mesh, local=True, rules=self.rules)
                    state, metrics = self.step_fn(state, self.frozen, placed)
                    for h in self.hooks:
                        h.after_step(self, step + 1, state, metrics, batch)
                    if self.stopping:
                        raise Interrupted(f"stopped by signal {stop.signal} after step {step + 1}; checkpoint "
                                          "saved. Run the same command again to resume.")
            self._stop = None
            self.results["after"] = {"step": self.steps}
            for h in self.hooks:
                h.end(self, state)
            return state
        finally:
            for h in self.hooks:
                h.close()


def hooks_for(cfg, setup: Setup, data: pipeline.Prepared, writer, ckpt, loader) -> list[H.Hook]:
    """The periodic actions of a training run, in the order they act after each step."""
    eval_step = make_eval_step(setup.model, len(data.names))
    micro = cfg.train.batch_size // cfg.train.grad_accum
    out = [H.LogData(writer, setup.tokenizer, data),
           H.LogMetrics(cfg.train.log_every, writer, data.names, ckpt.latest_step, flops.for_run(cfg, setup))]
    if data.eval is not None:
        out.append(H.Evaluate(lambda t: evaluate(setup, eval_step, data.eval, t, micro, data.names),
                              cfg.train.eval_every, writer))
    convs = sample_conversations(cfg.train, data.eval_records)
    out += [H.Samples(setup, convs, cfg.train.sample_max_new_tokens, writer),
            H.Checkpoint(ckpt, cfg.checkpoint.every, loader)]
    return out


def train_step(cfg, setup: Setup, tx, sched, state, num_sources: int):
    """The jitted step for this config (rng only when something random trains: LoRA dropout, NEFTune)."""
    uses_rng = (cfg.lora.enabled and cfg.lora.dropout > 0) or cfg.train.neftune_alpha > 0
    return make_train_step(setup.model, tx, sched, cfg.train.grad_accum, uses_rng, cfg.train.seed,
                           jax.tree.map(lambda x: x.sharding, state), num_sources, cfg.train.fgm_epsilon)


def run(cfg, workdir: str) -> dict:
    """Train per a validated `cfg` in `workdir`; returns the results dict also written to results.json."""
    tok = load_tokenizer(cfg.model.path)
    data = pipeline.load(cfg, tok)  # bad data fails fast, before the model loads or any file is written
    setup = build(cfg, tok)  # the tokenizer with data.chat_template applied: samples use it too
    for name, rep in data.report.items():
        log.info("data %s: %s", name, rep)
    check_batch(setup.mesh, cfg.train.batch_size // cfg.train.grad_accum, setup.rules)
    slots = None if cfg.data.packing else pipeline.head_slots(data.train, cfg.data.max_length)
    loader = make_loader(data.train, data.weights, cfg.data, cfg.train.batch_size, tok.pad_token_id, slots,
                         jax.process_index(), jax.process_count())
    state, tx, sched = init_state(setup, cfg.optim, cfg.train.steps)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        W.write_config(cfg, workdir)
    ckpt, writer = Checkpointer(workdir, cfg.checkpoint.max_to_keep), Writer(workdir)
    results_path = os.path.join(workdir, W.RESULTS)
    loop = Loop(train_step(cfg, setup, tx, sched, state, len(data.names)), setup.frozen, loader, setup.mesh,
                cfg.train.steps, hooks_for(cfg, setup, data, writer, ckpt, loader), start=ckpt.latest_step() or 0,
                rules=setup.rules)
    try:
        if loop.start:
            state = ckpt.restore(loop.start, state, loader)
            loop.results = W.read_json(results_path) or {}
            log.info("resumed from %s at step %d", ckpt.dir, loop.start)
        else:
            loop.results = {"before": {}, "data": data.report}
        loop.run(state)
    finally:  # also on errors and signals: finish pending async saves, flush events, keep results so far
        ckpt.close()
        loader.close()
        writer.close()
        if jax.process_index() == 0:
            W.write_json(results_path, loop.results)
    return loop.results
