"""The training loop: data -> state -> steps, with periodic actions as hooks; resumes by itself.

Running the same command again in the same workdir continues from the latest checkpoint; the data
loader's position is saved in the same checkpoint (see data/loader.py), so the resumed run sees
exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from sftjax.build import Setup, build
from sftjax.data import pipeline
from sftjax.data.labels import class_weights, head_for
from sftjax.data.loader import make_loader
from sftjax.errors import Interrupted
from sftjax.io.load import base_fingerprint, is_encoder, load_tokenizer
from sftjax.parallel import flops
from sftjax.parallel.mesh import RULES, check_batch, place_batch
from sftjax.train import hooks as H
from sftjax.train import workdir as W
from sftjax.train.checkpoint import Checkpointer
from sftjax.train.evaluate import evaluate, sample_conversations
from sftjax.train.metrics import Writer, summary
from sftjax.train.step import init_state, make_eval_step, make_predict_step, make_train_step

log = logging.getLogger("sftjax")


EXIT_GRACE = 143  # the grace period after a stop signal ran out before the checkpoint was saved
EXIT_SECOND_SIGNAL = 130  # a second signal: stopped at once, nothing saved


class StopRequest:
    """SIGTERM/SIGINT set a flag instead of killing the process, so the loop can finish the step,
    checkpoint and exit cleanly (preemptible machines, SLURM time limits, Ctrl-C). If that takes
    longer than `grace` seconds the process exits with EXIT_GRACE; a second signal exits at once
    with EXIT_SECOND_SIGNAL. Either way no half-written checkpoint is left: orbax writes a step
    under a temporary name and renames it when complete."""

    def __init__(self, grace: float = 120.0):
        self.signal: int | None = None
        self.grace = grace
        self._old: dict = {}
        self._timer: threading.Timer | None = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            _exit_now(EXIT_SECOND_SIGNAL, f"second signal {signum}: stopping at once, without saving")
        self.signal = signum
        log.warning("signal %d: finishing this step and saving (at most %.0f s; a second signal stops at once)",
                    signum, self.grace)
        self._timer = threading.Timer(self.grace, _exit_now, (EXIT_GRACE, f"train.stop_grace_secs={self.grace:g} "
                                      "passed before the checkpoint was saved: stopping without it"))
        self._timer.daemon = True
        self._timer.start()

    def __exit__(self, *exc):
        """Restore the handlers; after a signal the grace timer keeps running until `release`,
        so it also bounds what the caller finishes afterwards (waiting for the asynchronous save)."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self.signal is None:
            self.release()

    def release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _exit_now(code: int, why: str) -> None:
    print(f"stopped: {why}", file=sys.stderr, flush=True)
    os._exit(code)


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
    grace: float = 120.0  # train.stop_grace_secs
    done: int = 0  # steps done so far
    stop_reason: str | None = None  # set by a hook (early stopping): the loop ends after this step
    last_eval: tuple = (None, None)  # (step, metrics) of the latest evaluation (the Evaluate hook's)
    keep_grace: bool = False  # True: the caller calls `release` after its own final work (see `run`)
    _stop: StopRequest | None = None
    _request: StopRequest | None = None

    @property
    def signalled(self) -> bool:
        return self._stop is not None and self._stop.signal is not None

    @property
    def stopping(self) -> bool:
        """The loop ends after this step (a signal, or a hook's `request_stop`): hooks save what they must."""
        return self.signalled or self.stop_reason is not None

    def request_stop(self, reason: str) -> None:
        """End the run after this step as a finished one (`end` hooks run); `reason` goes to the log and results."""
        self.stop_reason = reason

    def run(self, state):
        try:
            self.done = self.start
            for h in self.hooks:
                h.start(self, state)
            with StopRequest(self.grace) as stop:
                self._stop = self._request = stop
                for step in range(self.start, self.steps):
                    batch = next(self.loader)
                    placed = place_batch(batch, self.mesh, local=True, rules=self.rules)
                    state, metrics = self.step_fn(state, self.frozen, placed)
                    self.done = step + 1
                    for h in self.hooks:
                        h.after_step(self, step + 1, state, metrics, batch)
                    if self.signalled:
                        self.results["stopped"] = f"signal {stop.signal} after step {step + 1}"
                        raise Interrupted(f"signal {stop.signal}: stopped after step {step + 1}; checkpoint "
                                          "saved. Run the same command again to resume.")
                    if self.stop_reason is not None:
                        self.results["stopped"] = self.stop_reason
                        log.info("stopping after step %d: %s", step + 1, self.stop_reason)
                        break
                self._stop = None
                self.results["after"] = {"step": self.done}
                for h in self.hooks:  # still under the handler: a signal here saves nothing more, exits 0
                    h.end(self, state)
            return state
        finally:
            for h in self.hooks:
                h.close()
            if not self.keep_grace:
                self.release()

    def release(self) -> None:
        """End the grace period a stop signal started (no-op without one)."""
        if self._request is not None:
            self._request.release()


def hooks_for(cfg, setup: Setup, data: pipeline.Prepared, writer, ckpt, loader) -> list[H.Hook]:
    """The periodic actions of a training run, in the order they act after each step."""
    eval_step = make_eval_step(setup.model, len(data.names))
    predict_step = None if setup.head is None else make_predict_step(setup.model)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    out = [H.LogHparams(writer, cfg), H.LogData(writer, setup.tokenizer, data),
           H.LogMetrics(cfg.train.log_every, writer, data.names, flops.for_run(cfg, setup)),
           H.NonFinite(cfg.train.on_nonfinite, cfg.train.max_nonfinite, ckpt.latest_step)]
    if data.eval is not None:
        best = (cfg.checkpoint.best_metric, cfg.checkpoint.best_mode) if cfg.checkpoint.best_metric else None
        out.append(H.Evaluate(lambda t: evaluate(setup, eval_step, data.eval, t, micro, data.names, predict_step,
                                                 data.forgetting),
                              cfg.train.eval_every, writer, best))
    convs = sample_conversations(cfg.train, data.eval_records)
    if data.eval is not None and cfg.early_stop.patience:
        out.append(H.EarlyStop(cfg.checkpoint.best_metric, cfg.checkpoint.best_mode, cfg.early_stop.patience,
                               cfg.early_stop.min_delta))
    if setup.head is None:  # a task head generates nothing
        out.append(H.Samples(setup, convs, cfg.train.sample_max_new_tokens, writer))
    out.append(H.Checkpoint(ckpt, cfg.checkpoint.every, loader))
    return out


def train_step(cfg, setup: Setup, tx, sched, state, num_sources: int):
    """The jitted step for this config (rng only when something random trains: LoRA dropout, NEFTune)."""
    uses_rng = (cfg.lora.enabled and cfg.lora.dropout > 0) or cfg.train.neftune_alpha > 0
    return make_train_step(setup.model, tx, sched, cfg.train.grad_accum, uses_rng, cfg.train.seed,
                           jax.tree.map(lambda x: x.sharding, state), num_sources, cfg.train.fgm_epsilon)


def run(cfg, workdir: str) -> dict:
    """Train per a validated `cfg` in `workdir`; returns the results dict also written to results.json."""
    W.check_writable(workdir, "--workdir")  # a bad path fails before data, model or compile
    started = time.perf_counter()
    ckpt = Checkpointer(workdir, cfg.checkpoint, base_fingerprint(cfg.model.path))
    loader = writer = None
    loop = Loop(None, None, None, None, cfg.train.steps, [])
    try:
        ckpt.check_newest_base()  # a workdir trained on another base fails here, before anything slow
        loader, writer, loop, state = _prepare(cfg, workdir, ckpt)
        loop.run(state)
    finally:  # also on errors and signals: finish pending async saves, flush events, keep results so far
        try:
            ckpt.close()
            for closable in (loader, writer):
                if closable is not None:
                    closable.close()
            if jax.process_index() == 0 and loop.results:
                W.write_json(os.path.join(workdir, W.RESULTS), loop.results)
                log.info("%s", summary(loop.results, workdir, loop.done, loop.steps, time.perf_counter() - started))
        finally:
            loop.release()  # after a stop signal the grace period covered the asynchronous save too
    return loop.results


def _prepare(cfg, workdir: str, ckpt: Checkpointer):
    """(loader, writer, Loop, state): ready to run from the newest readable checkpoint, if any."""
    tok = load_tokenizer(cfg.model.path)
    head = head_for(cfg, is_encoder(cfg.model.path))
    data = pipeline.load(cfg, tok, head)  # bad data fails fast, before the model loads or any file is written
    setup = build(cfg, tok)  # the tokenizer with data.chat_template applied: samples use it too
    for name, rep in data.report.items():
        log.info("data %s: %s", name, rep)
    check_batch(setup.mesh, cfg.train.batch_size // cfg.train.grad_accum, setup.rules)
    slots = pipeline.head_slots(data.train, cfg.data.max_length, cfg.data.packing)
    if slots:
        log.info("vocabulary head at %d target slots per row of %d tokens", slots, cfg.data.max_length)
    weights = None if head is None else class_weights(cfg, head, np.concatenate([s.labels for s in data.train]))
    if weights is not None:
        log.info("class weights: %s", ", ".join(f"{n}={w:.3g}" for n, w in zip(head.names, weights, strict=True)))
    loader = make_loader(data.train, data.weights, cfg.data, cfg.train.batch_size, tok.pad_token_id, slots,
                         jax.process_index(), jax.process_count(), class_weights=weights)
    state, tx, sched = init_state(setup, cfg.optim, cfg.train.steps)
    if jax.process_index() == 0:
        W.write_config(cfg, workdir)
    writer = Writer(workdir)
    start, restored = ckpt.restore_newest(state, loader)
    loop = Loop(train_step(cfg, setup, tx, sched, state, len(data.names)), setup.frozen, loader, setup.mesh,
                cfg.train.steps, hooks_for(cfg, setup, data, writer, ckpt, loader), start=start or 0,
                rules=setup.rules, grace=cfg.train.stop_grace_secs, keep_grace=True)
    if start:
        state = restored
        loop.results = W.read_json(os.path.join(workdir, W.RESULTS)) or {}
        loop.results.pop("stopped", None)
        log.info("resumed from %s at step %d", ckpt.dir, start)
    else:
        loop.results = {"before": {}, "data": data.report}
    return loader, writer, loop, state
