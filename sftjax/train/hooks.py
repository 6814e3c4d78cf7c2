"""The loop's periodic actions, each a `Hook`: metrics and progress, evaluation, samples,
checkpoints, the first examples in TensorBoard. New actions (early stopping, keep-best, ...) are
new hooks registered in `train.loop.hooks_for`; the loop itself does not change.
"""

from __future__ import annotations

import logging
import resource
import time

import jax
import numpy as np
from tqdm import tqdm

from sftjax.data.inspect import highlight
from sftjax.errors import UserError
from sftjax.parallel.flops import batch_flops
from sftjax.train.evaluate import per_source, samples, short_name
from sftjax.train.metrics import eval_line, memory

log = logging.getLogger("sftjax")


class Hook:
    """A periodic action. The loop calls `start` once before its first step (`loop.start` is 0 on
    a fresh run, the restored step on a resumed one), `after_step` after every step with the step
    count done so far (metrics still on device: read them only when acting), `end` after the last
    step (not after a stop on a signal), and `close` always, last."""

    def start(self, loop, state) -> None:
        pass

    def after_step(self, loop, done: int, state, metrics, batch) -> None:
        pass

    def end(self, loop, state) -> None:
        pass

    def close(self) -> None:
        pass


def gain(value: float, best: float, mode: str) -> float:
    """How much `value` improves on `best` (positive: better) for a metric that improves to `mode`
    (min | max): the one comparison behind keep-best, early stopping and the eval line's best."""
    return best - value if mode == "min" else value - best


def fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def peak_memory() -> tuple[int, str]:
    """(bytes, what was measured): the first local device's peak allocation where the backend
    reports it (GPU, TPU), else this process's peak resident set (CPU, where device memory is host
    memory)."""
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host_rss"


class LogMetrics(Hook):
    """Every `every` steps and at the end: train scalars to TensorBoard and the progress bar,
    tokens/s and MFU after the compile step, the non-pad fraction (the metrics are read at logging
    time only: no host sync per step; non-finite steps are the NonFinite hook's). `mfu`: (StepCost,
    Peak) from `parallel.flops`, or None where the devices' peak is unknown."""

    def __init__(self, every: int, writer, names: list[str], mfu=None):
        self.every, self.writer, self.names = every, writer, names
        self.cost, self.peak = mfu if mfu is not None else (None, None)
        self.bar = None

    def start(self, loop, state):
        self.t_last, self.tok_since, self.compiled_at = time.perf_counter(), 0, None
        self.run_tokens, self.run_secs, self.flops_since, self.run_flops = 0, 0.0, 0.0, 0.0
        self.real, self.slots = 0, 0  # non-pad and total positions: packing / bucketing efficiency

    def after_step(self, loop, done, state, metrics, batch):
        if self.bar is None:  # made at the first step, so it follows what other hooks print at start
            self.bar = tqdm(total=loop.steps, initial=done - 1, desc="train", disable=jax.process_index() != 0,
                            dynamic_ncols=True)
        self.bar.update(1)
        n_real = int(batch["valid"].sum()) * jax.process_count()
        self.tok_since += n_real
        if self.cost is not None:  # host arithmetic on the host batch: no device sync
            self.flops_since += batch_flops(self.cost, batch) * jax.process_count()
        self.real, self.slots = self.real + n_real, self.slots + batch["valid"].size * jax.process_count()
        if self.compiled_at is None:  # the first step includes compilation; rates start after it
            jax.block_until_ready(metrics)
            now = time.perf_counter()
            loop.results["first_step_secs"] = now - self.t_last  # compile + the first step
            self.t_last, self.tok_since, self.flops_since, self.compiled_at = now, 0, 0.0, done
            self.t_step = done  # the step t_last was taken after
        if done % self.every == 0 or done == loop.steps:
            self.log(loop, done, metrics)

    def log(self, loop, done, metrics):
        m = {**{k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}, **per_source(metrics, self.names)}
        m["nonpad_fraction"] = loop.results["nonpad_fraction"] = self.real / self.slots
        now = time.perf_counter()
        if done > self.compiled_at:
            m["tokens_per_sec"] = self.tok_since / (now - self.t_last)
            m["step_secs"] = (now - self.t_last) / (done - self.t_step)  # over this interval, after compile
            self.run_tokens, self.run_secs = self.run_tokens + self.tok_since, self.run_secs + now - self.t_last
            loop.results["train_tokens_per_sec"] = self.run_tokens / self.run_secs  # mean over this run, after compile
            loop.results["train_step_secs"] = self.run_secs / (done - self.compiled_at)
            if self.peak is not None:
                m["mfu"] = self.flops_since / (now - self.t_last) / self.peak.total
                self.run_flops += self.flops_since
                loop.results["train_mfu"] = self.run_flops / self.run_secs / self.peak.total
                loop.results["peak_flops_per_sec"], loop.results["peak_source"] = self.peak.total, self.peak.source
        self.t_last, self.tok_since, self.flops_since, self.t_step = now, 0, 0.0, done
        loop.results["train_loss"] = m["loss"]
        loop.results["peak_memory_bytes"], loop.results["peak_memory_of"] = peak_memory()
        m.update(memory())  # host RSS now and peak; device bytes where the backend reports them
        self.writer.scalars(done, m, "train/")
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m.get('tokens_per_sec', 0):.0f}")

    def end(self, loop, state):
        self.close()  # before the final evaluation and samples print: their lines then stand alone

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Evaluate(Hook):
    """Held-out metrics before training (fresh runs), every `every` steps (0: never) and after: to
    TensorBoard under eval/ (per source as eval/loss/SOURCE) and one console line each. `best`:
    (checkpoint.best_metric, best_mode) when the run keeps a best checkpoint, for the line's "best so
    far" (the Checkpoint hook records it after this one, so the line weighs this evaluation in)."""

    def __init__(self, run_eval, every: int, writer, best: tuple[str, str] | None = None):
        self.run_eval, self.every, self.writer, self.best = run_eval, every, writer, best

    def _eval(self, loop, step: int, state, when: str) -> dict:
        ev = self.run_eval(state.trainable)
        loop.last_eval = (step, ev)  # keep-best and early stopping read it after this hook
        self.writer.scalars(step, ev, "eval/")
        log.info("%s", eval_line(when, ev, self._best_so_far(loop, step, ev)))
        return ev

    def _best_so_far(self, loop, step: int, ev: dict) -> dict | None:
        """The recorded best, or this evaluation if it beats it (step 0 has no checkpoint to keep)."""
        if self.best is None or self.best[0] not in ev:
            return None
        best, value = loop.results.get("best"), ev[self.best[0]]
        if step and (best is None or gain(value, best["value"], self.best[1]) > 0):
            return {"metric": self.best[0], "value": value, "step": step}
        return best

    def start(self, loop, state):
        if loop.start == 0:
            loop.results["before"]["eval"] = self._eval(loop, 0, state, "before training")

    def after_step(self, loop, done, state, metrics, batch):
        if self.every and done % self.every == 0 and done < loop.steps:
            self._eval(loop, done, state, f"at step {done}")

    def end(self, loop, state):
        step, ev = loop.last_eval
        if step != loop.done:  # an early stop right after an evaluation has it already
            ev = self._eval(loop, loop.done, state, "after training")
        loop.results["after"]["eval"] = ev


class Samples(Hook):
    """Generations for the sample conversations before (fresh runs) and after training."""

    def __init__(self, setup, convs, max_new_tokens: int, writer):
        self.setup, self.convs, self.max_new_tokens, self.writer = setup, convs, max_new_tokens, writer

    def start(self, loop, state):
        if loop.start == 0:
            loop.results["before"]["samples"] = samples(self.setup, state.trainable, self.convs, self.max_new_tokens)

    def end(self, loop, state):
        after = loop.results["after"]["samples"] = samples(self.setup, state.trainable, self.convs,
                                                           self.max_new_tokens)
        prompts = loop.results["sample_prompts"] = [c[-1]["content"] for c in self.convs]
        before_all = loop.results.get("before", {}).get("samples") or [""] * len(prompts)
        for i, (prompt, before) in enumerate(zip(prompts, before_all, strict=True)):
            self.writer.text(loop.steps, f"samples/{i}", f"**prompt** {prompt}\n\n**before** {before}\n\n"
                                                         f"**after** {after[i]}")
            log.info("sample %d: %r\n  before: %r\n  after:  %r", i, prompt, before, after[i])


class Checkpoint(Hook):
    """Saves the state and the data position every `every` steps, every checkpoint.every_minutes,
    at the end, on a stop request, and at every evaluation when a best metric is tracked (with that
    evaluation's metrics, so the best step is kept beside the latest ones)."""

    def __init__(self, ckpt, every: int, loader):
        self.ckpt, self.every, self.loader = ckpt, every, loader

    def start(self, loop, state):
        loop.results["checkpoints"] = self.ckpt.dir
        ev = loop.last_eval[1]
        if self.ckpt.metric and ev is not None and self.ckpt.metric not in ev:
            raise UserError(f"checkpoint.best_metric: this run's evaluation has no {self.ckpt.metric!r}; it reports "
                            f"{', '.join(k for k in ev if k != 'examples')}")
        self.best = self.ckpt.best() if self.ckpt.metric and loop.start else None

    def after_step(self, loop, done, state, metrics, batch):
        evaluated = bool(self.ckpt.metric) and loop.last_eval[0] == done
        final = done == loop.steps and not loop.signalled
        if final and self.ckpt.metric and not evaluated:
            return  # saved by `end`, with the final evaluation's metrics
        if done % self.every == 0 or final or loop.stopping or evaluated or self.ckpt.due():
            self._save(loop, done, state, loop.last_eval[1] if evaluated else None)

    def end(self, loop, state):
        step, ev = loop.last_eval
        if loop.done not in self.ckpt.steps():
            self._save(loop, loop.done, state, ev if self.ckpt.metric and step == loop.done else None)

    def _save(self, loop, step: int, state, ev: dict | None) -> None:
        self.ckpt.save(step, state, self.loader, ev)
        if ev is not None:
            self._track(loop, step, ev[self.ckpt.metric])

    def _track(self, loop, step: int, value: float) -> None:
        if self.best is None or gain(value, self.best[1], self.ckpt.mode) > 0:
            self.best = (step, value)
        loop.results["best"] = {"metric": self.ckpt.metric, "value": self.best[1], "step": self.best[0]}


class NonFinite(Hook):
    """Acts on the step's `nonfinite` flag (the step itself already left parameters and optimizer
    state untouched). The flag of step k is read after step k+1 is dispatched, so the host never
    waits for the device; the last step's is read at the end. `policy` stop: a UserError naming
    the step; skip: a warning per step, and a UserError after `max_in_row` in a row."""

    def __init__(self, policy: str, max_in_row: int, last_checkpoint):
        self.policy, self.max_in_row, self.last_checkpoint = policy, max_in_row, last_checkpoint
        self.pending, self.in_row = None, 0

    def after_step(self, loop, done, state, metrics, batch):
        prev, self.pending = self.pending, (done, metrics["nonfinite"], metrics["loss"], metrics["grad_norm"])
        if prev is not None:
            self._check(loop, *prev)
        if done == loop.steps or loop.stopping:
            self._check(loop, *self.pending)
            self.pending = None

    def _check(self, loop, step, flag, loss, grad_norm):
        if not int(flag):
            self.in_row = 0
            return
        self.in_row += 1
        loop.results["nonfinite_steps"] = loop.results.get("nonfinite_steps", 0) + 1
        what = f"step {step}: the loss is {float(loss)}, the gradient norm {float(grad_norm)}; update not applied"
        where = f"the last checkpoint is step {self.last_checkpoint()}; lower optim.lr or check the data"
        if self.policy == "stop":
            raise UserError(f"train.on_nonfinite=stop: {what}; {where}")
        log.warning("train.on_nonfinite=skip: %s (%d in a row)", what, self.in_row)
        if self.in_row >= self.max_in_row:
            raise UserError(f"train.max_nonfinite={self.max_in_row}: {self.in_row} non-finite steps in a row, the "
                            f"last at {what.removeprefix('step ')}; {where}")


class EarlyStop(Hook):
    """Stops the run when checkpoint.best_metric has not improved by more than `min_delta` for
    `patience` evaluations in a row (the loop then ends as a finished run: final evaluation,
    samples and the last checkpoint; export then picks the best checkpoint)."""

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float):
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.best, self.bad = None, 0

    def after_step(self, loop, done, state, metrics, batch):
        step, ev = loop.last_eval
        if step != done:
            return
        value = ev[self.metric]
        if self.best is None or gain(value, self.best[1], self.mode) > self.min_delta:
            self.best, self.bad = (step, value), 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            loop.request_stop(f"early stopping: eval {self.metric} did not improve by more than {self.min_delta:g} "
                              f"for {self.bad} evaluations (best {self.best[1]:.4f} at step {self.best[0]})")


class LogData(Hook):
    """The first training examples of each source, targets in bold (TensorBoard), on a fresh run."""

    def __init__(self, writer, tokenizer, data, n: int = 3):
        self.writer, self.tokenizer, self.data, self.n = writer, tokenizer, data, n

    def start(self, loop, state):
        if loop.start:
            return
        for name, store in zip(self.data.names, self.data.train, strict=True):
            for i in range(min(self.n, len(store))):
                ids, mask = store.example(i)
                self.writer.text(0, f"data/{short_name(name)}/{i}",
                                 f"`{store.wheres[i]}`\n\n" + highlight(self.tokenizer, ids, mask, "markdown"))


class LogHparams(Hook):
    """The run's config in TensorBoard's HPARAMS tab, written once at the start of a fresh run (a
    resumed run continues the same session, so its config is already there)."""

    def __init__(self, writer, cfg):
        self.writer, self.cfg = writer, cfg

    def start(self, loop, state):
        if loop.start == 0:
            self.writer.hparams(self.cfg)
