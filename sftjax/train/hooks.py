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
    tokens/s and MFU after the compile step, the non-pad fraction, and a non-finite loss check (at
    logging time only: no host sync per step). `mfu`: (StepCost, Peak) from `parallel.flops`, or
    None where the devices' peak is unknown."""

    def __init__(self, every: int, writer, names: list[str], last_checkpoint, mfu=None):
        self.every, self.writer, self.names, self.last_checkpoint = every, writer, names, last_checkpoint
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
        if done % self.every == 0 or done == loop.steps:
            self.log(loop, done, metrics)

    def log(self, loop, done, metrics):
        m = {**{k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}, **per_source(metrics, self.names)}
        m["nonpad_fraction"] = loop.results["nonpad_fraction"] = self.real / self.slots
        if not np.isfinite(m["loss"]):
            raise UserError(f"optim.lr: the loss is {m['loss']} at step {done}; lower the learning rate "
                            f"(or check the data); the last checkpoint is step {self.last_checkpoint()}")
        now = time.perf_counter()
        if done > self.compiled_at:
            m["tokens_per_sec"] = self.tok_since / (now - self.t_last)
            self.run_tokens, self.run_secs = self.run_tokens + self.tok_since, self.run_secs + now - self.t_last
            loop.results["train_tokens_per_sec"] = self.run_tokens / self.run_secs  # mean over this run, after compile
            loop.results["train_step_secs"] = self.run_secs / (done - self.compiled_at)
            if self.peak is not None:
                m["mfu"] = self.flops_since / (now - self.t_last) / self.peak.total
                self.run_flops += self.flops_since
                loop.results["train_mfu"] = self.run_flops / self.run_secs / self.peak.total
                loop.results["peak_flops_per_sec"], loop.results["peak_source"] = self.peak.total, self.peak.source
        self.t_last, self.tok_since, self.flops_since = now, 0, 0.0
        loop.results["train_loss"] = m["loss"]
        loop.results["peak_memory_bytes"], loop.results["peak_memory_of"] = peak_memory()
        self.writer.scalars(done, m, "train/")
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m.get('tokens_per_sec', 0):.0f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Evaluate(Hook):
    """Held-out metrics before training (fresh runs), every `every` steps (0: never) and after."""

    def __init__(self, run_eval, every: int, writer):
        self.run_eval, self.every, self.writer = run_eval, every, writer

    def _eval(self, step: int, state, when: str) -> dict:
        ev = self.run_eval(state.trainable)
        self.writer.scalars(step, ev, "eval/")
        log.info("eval %s: %s", when, fmt(ev))
        return ev

    def start(self, loop, state):
        if loop.start == 0:
            loop.results["before"]["eval"] = self._eval(0, state, "before training")

    def after_step(self, loop, done, state, metrics, batch):
        if self.every and done % self.every == 0 and done < loop.steps:
            self._eval(done, state, f"at step {done}")

    def end(self, loop, state):
        loop.results["after"]["eval"] = self._eval(loop.steps, state, "after training")


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
    """Saves the state and the data position every `every` steps, at the end, and on a stop request."""

    def __init__(self, ckpt, every: int, loader):
        self.ckpt, self.every, self.loader = ckpt, every, loader

    def after_step(self, loop, done, state, metrics, batch):
        if done % self.every == 0 or done == loop.steps or loop.stopping:
            self.ckpt.save(done, state, self.loader)


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
