"""The training loop: data -> jitted step -> metrics, evaluation, checkpoints; resumes by itself.

Running the same command again in the same workdir continues from the latest checkpoint; the data
loader's position is saved in the same checkpoint (see data/loader.py), so the resumed run sees
exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from sftjax import config as C
from sftjax.train.checkpoint import Checkpointer
from sftjax.data import pipeline
from sftjax.data.inspect import highlight
from sftjax.data.loader import make_loader
from sftjax.errors import UserError
from sftjax.infer.generate import chat
from sftjax.train.metrics import Writer
from sftjax.train.optim import make_optimizer
from sftjax.build import Setup, build
from sftjax.parallel.mesh import place_batch
from sftjax.train.step import TrainState, make_eval_step, make_train_step
from sftjax.io.hf import load_tokenizer

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
    """Training stopped on a signal after saving a checkpoint."""


def evaluate(setup: Setup, eval_step, examples: pipeline.Examples, trainable, batch_size: int,
             names: list[str] = ()) -> dict:
    """Held-out loss, perplexity, token accuracy and exact match (every target token argmax-correct,
    i.e. greedy decoding would reproduce the whole reply); with several sources, each one's loss."""
    n = len(examples)
    totals: dict[str, float | np.ndarray] = {}
    for s in range(0, n, batch_size):
        rows = np.arange(s, s + batch_size)
        batch = examples.batch(np.minimum(rows, n - 1))
        batch["weights"] = batch["weights"] * (rows < n)[:, None]  # padding rows count for nothing
        stats = eval_step(trainable, setup.frozen, place_batch(batch, setup.mesh))
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
    loss = float(totals["loss_sum"] / max(totals["tokens"], 1))
    out = {"loss": loss, "perplexity": float(np.exp(loss)), "token_accuracy": float(totals["correct"] / max(totals["tokens"], 1)),
           "exact_match": float(totals["exact"] / max(totals["rows"], 1)), "examples": int(totals["rows"])}
    out.update(per_source(totals, names))
    return out


def per_source(stats: dict, names: list[str]) -> dict[str, float]:
    """`loss/NAME` for each source with target tokens in `stats` (summed loss_by_source etc.)."""
    if "loss_by_source" not in stats:
        return {}
    loss, tokens = np.asarray(stats["loss_by_source"]), np.asarray(stats["tokens_by_source"])
    return {f"loss/{short_name(name)}": float(loss[i] / tokens[i]) for i, name in enumerate(names) if tokens[i] > 0}


def short_name(source: str) -> str:
    """recipe:trec -> trec, /data/chat.jsonl -> chat."""
    return os.path.splitext(os.path.basename(source.removeprefix("recipe:").rstrip("/")))[0]


def sample_conversations(cfg, eval_rec) -> list[list[dict]]:
    """Free prompts from train.sample_prompts, then the first train.sample_eval held-out
    conversations cut before their last assistant turn."""
    convs = [[{"role": "user", "content": p}] for p in cfg.train.sample_prompts]
    for rec in eval_rec[: cfg.train.sample_eval]:
        last = max(i for i, m in enumerate(rec.messages) if m["role"] == "assistant")
        convs.append(list(rec.messages[:last]))
    return convs


def samples(setup: Setup, trainable, convs, max_new_tokens: int) -> list[str]:
    if not convs:
        return []
    return chat(setup.model, setup.full_params(trainable), setup.tokenizer, convs, max_new_tokens)


def initial_state(setup: Setup, cfg):
    """(TrainState at step 0, optimizer, schedule); also the restore target for checkpoints."""
    tx, sched = make_optimizer(cfg.optim, setup.trainable, cfg.train.steps)
    state = TrainState(jnp.zeros((), jnp.int32), setup.trainable, jax.jit(tx.init)(setup.trainable))
    # Pin every leaf to a mesh sharding (scalars and anything XLA left on one device: replicated),
    # so the jitted step's outputs match its inputs and it compiles exactly once.
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    shardings = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, state)
    return jax.device_put(state, shardings), tx, sched


def run(cfg, workdir: str) -> dict:
    """Train per `cfg` in `workdir`; returns the results dict also written to results.json."""
    C.validate(cfg)
    tok = load_tokenizer(cfg.model.path)
    data = pipeline.load(cfg, tok)  # bad data fails fast, before the model loads or any file is written
    setup = build(cfg, tok)  # the tokenizer with data.chat_template applied: samples use it too
    for name, rep in data.report.items():
        log.info("data %s: %s", name, rep)
    convs = sample_conversations(cfg, data.eval_records)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    dp = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
    if micro % dp:
        raise UserError(f"train.batch_size: micro-batch {micro} is not divisible by the data-parallel size {dp}")
    slots = None if cfg.data.packing else pipeline.head_slots(data.train, cfg.data.max_length)
    loader = make_loader(data.train, data.weights, cfg.data, cfg.train.batch_size, tok.pad_token_id, slots,
                         jax.process_index(), jax.process_count())
    n_src = len(data.names)

    state, tx, sched = initial_state(setup, cfg)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        _write_config(cfg, os.path.join(workdir, "sftjax_config.json"))
    ckpt = Checkpointer(workdir, cfg.checkpoint.max_to_keep)
    results_path = os.path.join(workdir, "results.json")
    results = _read_json(results_path) or {}
    start = ckpt.latest_step() or 0
    uses_rng = (cfg.lora.enabled and cfg.lora.dropout > 0) or cfg.train.neftune_alpha > 0
    step_fn = make_train_step(setup.model, tx, sched, cfg.train.grad_accum, uses_rng, cfg.train.seed,
                              jax.tree.map(lambda x: x.sharding, state), n_src, fgm_epsilon=cfg.train.fgm_epsilon)
    eval_step = make_eval_step(setup.model, n_src)
    run_eval = None if data.eval is None else (
        lambda trainable: evaluate(setup, eval_step, data.eval, trainable, micro, data.names))
    writer = Writer(workdir)
    try:
        if start:
            state = ckpt.restore(start, state, loader)
            log.info("resumed from %s at step %d", ckpt.dir, start)
        else:
            results = {"before": {}, "data": data.report}
            _log_examples(writer, tok, data)
            if run_eval is not None:
                results["before"]["eval"] = run_eval(state.trainable)
                writer.scalars(0, results["before"]["eval"], "eval/")
                log.info("eval before training: %s", _fmt(results["before"]["eval"]))
            results["before"]["samples"] = samples(setup, state.trainable, convs, cfg.train.sample_max_new_tokens)
        state = _train_steps(cfg, setup, state, step_fn, loader, data.names, start, run_eval, writer, ckpt, results)
        results["after"] = {"step": cfg.train.steps}
        if run_eval is not None:
            results["after"]["eval"] = run_eval(state.trainable)
            writer.scalars(cfg.train.steps, results["after"]["eval"], "eval/")
            log.info("eval after training: %s", _fmt(results["after"]["eval"]))
        results["after"]["samples"] = samples(setup, state.trainable, convs, cfg.train.sample_max_new_tokens)
        results["sample_prompts"] = [c[-1]["content"] for c in convs]
        for i, prompt in enumerate(results["sample_prompts"]):
            before = (results.get("before", {}).get("samples") or [""] * (i + 1))[i]
            after = results["after"]["samples"][i]
            writer.text(cfg.train.steps, f"samples/{i}",
                        f"**prompt** {prompt}\n\n**before** {before}\n\n**after** {after}")
            log.info("sample %d: %r\n  before: %r\n  after:  %r", i, prompt, before, after)
    finally:  # also on errors and signals: finish pending async saves, flush events, keep results so far
        ckpt.close()
        loader.close()
        writer.close()
        if jax.process_index() == 0:
            _write_json(results_path, results)
    return results


def _train_steps(cfg, setup: Setup, state, step_fn, loader, names, start: int, run_eval, writer, ckpt,
                 results: dict):
    """Steps start..train.steps: log every train.log_every, evaluate every train.eval_every,
    checkpoint every checkpoint.every and at the end; on SIGTERM/SIGINT checkpoint and raise."""
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="train",
               disable=jax.process_index() != 0, dynamic_ncols=True)
    t_last, tok_since, compiled_at = time.perf_counter(), 0, None
    run_tokens, run_secs = 0, 0.0
    real, slots = 0, 0  # non-pad and total positions: packing / bucketing efficiency
    with StopRequest() as stop, bar:
        for step in bar:
            batch = next(loader)
            state, m = step_fn(state, setup.frozen, place_batch(batch, setup.mesh, local=True))
            n_real = int(batch["valid"].sum()) * jax.process_count()
            tok_since += n_real
            real, slots = real + n_real, slots + batch["valid"].size * jax.process_count()
            if compiled_at is None:  # the first step includes compilation; rates start after it
                jax.block_until_ready(m)
                t_last, tok_since, compiled_at = time.perf_counter(), 0, step + 1
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                m = {**{k: float(v) for k, v in m.items() if np.ndim(v) == 0}, **per_source(m, names)}
                m["nonpad_fraction"] = results["nonpad_fraction"] = real / slots
                if not np.isfinite(m["loss"]):  # checked at logging time only: no per-step host sync
                    raise UserError(f"optim.lr: the loss is {m['loss']} at step {done}; lower the learning rate "
                                    f"(or check the data); the last checkpoint is step {ckpt.latest_step()}")
                now = time.perf_counter()
                if done > compiled_at:
                    m["tokens_per_sec"] = tok_since / (now - t_last)
                    run_tokens, run_secs = run_tokens + tok_since, run_secs + now - t_last
                    results["train_tokens_per_sec"] = run_tokens / run_secs  # mean over this run, after compile
                t_last, tok_since = now, 0
                writer.scalars(done, m, "train/")
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m.get('tokens_per_sec', 0):.0f}")
            if run_eval is not None and cfg.train.eval_every and done % cfg.train.eval_every == 0 \
                    and done < cfg.train.steps:
                ev = run_eval(state.trainable)
                writer.scalars(done, ev, "eval/")
                log.info("eval at step %d: %s", done, _fmt(ev))
            if done % cfg.checkpoint.every == 0 or done == cfg.train.steps or stop.signal is not None:
                ckpt.save(done, state, loader)
            if stop.signal is not None:
                raise Interrupted(f"stopped by signal {stop.signal} after step {done}; checkpoint saved in "
                                  f"{ckpt.dir}. Run the same command again to resume.")
    return state


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _log_examples(writer, tokenizer, data, n: int = 3) -> None:
    """The first training examples of each source with their target tokens in bold (TensorBoard)."""
    for name, store in zip(data.names, data.train, strict=True):
        for i in range(min(n, len(store))):
            ids, mask = store.example(i)
            writer.text(0, f"data/{short_name(name)}/{i}", f"`{store.wheres[i]}`\n\n" + highlight(tokenizer, ids, mask, "markdown"))


def _write_config(cfg, path: str) -> None:
    """Save the run's config (generate/export rebuild from it); warn when a resumed run changed it,
    since e.g. a new train.steps reshapes the learning-rate schedule mid-run."""
    new = json.loads(C.to_json(cfg))
    old = _read_json(path)
    if old is not None:
        changed = [f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
        if changed:
            log.warning("%s: this workdir was run with a different config before; changed: %s", path,
                        ", ".join(changed))
    _write_json(path, new)


def _write_json(path: str, obj) -> None:
    """Write-then-rename, so a crash never leaves a truncated file behind."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
