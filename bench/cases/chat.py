"""Real SFT work with the loss on the assistant replies only: `sft_chat`, the `recipe:chitchat`
conversations (multi-turn small talk, long replies), and `sft_trec`, the `recipe:trec` questions
answered with their one-word type (the quickstart's task: short examples, few targets).
SmolLM2-135M-Instruct (the embedded GGUF, float32 on both sides), LoRA r=8 alpha=16 on q,v, AdamW
lr 2e-4 constant, weight decay 0.01, clipping at 1.0, 8 rows or examples per step,
data.max_length=256.

Both sides train on the same examples with the same token ids and loss masks: each side runs
sftjax's data path (records -> filters -> chat template -> ids + assistant mask -> packed loader)
and the examples are read back out of the packed batches, so what torch trains on is exactly what
sftjax's timed steps held. sftjax trains through its own loop (`train.loop.Loop`, the real loader
with prefetch, the jitted step) with packing and the head slots `sftjax train` would use (TREC: the
vocabulary head only at target positions; chitchat's replies are too long for slots, so none);
torch through transformers' `Trainer` + peft with
their defaults: each batch of 8 examples padded to its longest (`DataCollatorForSeq2Seq`, labels
-100 off the replies), in the same order (`train_sampling_strategy="sequential"`).

Steps differ in size (a packed row holds one or more examples), so the fair figures are per
target token and per example over the whole timed pass, which covers the same examples on both
sides (at least EXAMPLES, after the compile step and --warmup steps). The two loss lines are a
check, not a race: loss per target token in millinats, ~1.00x when both sides computed the same
thing (the first batch, before any update, should agree to ~1 mnat).
"""

from __future__ import annotations

import functools
import time

import numpy as np

from bench.cases import FIRST_STEP, PEAK_RSS, Case, Measure

EXAMPLES = 24  # examples in the timed pass, at least (whole packed steps; --steps usually gives more)


def config(recipe: str):
    """The SFT run on `recipe`, the same settings the torch side copies."""
    from sftjax.config import base_config, validate

    cfg = base_config()
    cfg.data.train = f"recipe:{recipe}"
    cfg.data.packing = True
    cfg.data.max_eval_examples = 1  # nothing is evaluated here
    cfg.optim.schedule, cfg.optim.warmup_steps = "constant", 0
    cfg.mesh.data = 1
    validate(cfg)
    return cfg


def examples(batch: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """The examples of one packed batch as (token ids [n], loss mask [n]), undoing the label shift:
    each segment of a row is one whole example (packing never splits one). With head slots the
    labels are those of the target positions only; an example whose last token is no target then
    comes back without it (no step reads that token: it is only the label of the last input)."""
    out = []
    for r, seg in enumerate(batch["segment_ids"]):
        if "head_positions" in batch:
            on = batch["weights"][r] > 0
            label = dict(zip(batch["head_positions"][r][on].tolist(), batch["labels"][r][on].tolist(), strict=True))
        else:
            label = {c: batch["labels"][r, c] for c in np.flatnonzero(batch["weights"][r] > 0)}
        for s in np.unique(seg[seg > 0]):
            at = np.flatnonzero(seg == s)
            mask = np.append(False, [c in label for c in at])
            if at[-1] in label:
                ids = np.append(batch["input_ids"][r, at], label[at[-1]])
            elif "head_positions" in batch:  # the last token is no target, so the batch does not hold it
                ids, mask = batch["input_ids"][r, at], mask[:-1]
            else:
                ids = np.append(batch["input_ids"][r, at], batch["labels"][r, at[-1]])
            out.append((ids, mask))
    return out


def prepare(a, recipe: str):
    """(cfg, tokenizer, prepared data, the batches both sides use): the first 1 + a.warmup untimed,
    then the timed ones, at least a.steps and enough to hold EXAMPLES examples."""
    from sftjax.data import pipeline
    from sftjax.io.load import load_tokenizer

    cfg = config(recipe)
    tok = load_tokenizer(cfg.model.path)
    data = pipeline.load(cfg, tok)
    loader = loader_for(cfg, tok, data, prefetch=0)
    batches = [next(loader) for _ in range(1 + a.warmup)]
    timed = 0
    while len(batches) < 1 + a.warmup + a.steps or timed < EXAMPLES:
        batches.append(next(loader))
        timed += len(examples(batches[-1]))
    loader.close()
    cfg.train.steps = len(batches)
    return cfg, tok, data, batches


def loader_for(cfg, tok, data, prefetch: int = 2):
    """The loader `sftjax train` would build (`train.loop._prepare`), head slots included."""
    from sftjax.data import pipeline
    from sftjax.data.loader import make_loader

    slots = pipeline.head_slots(data.train, cfg.data.max_length, cfg.data.packing)
    return make_loader(data.train, data.weights, cfg.data, cfg.train.batch_size, tok.pad_token_id, slots,
                       prefetch=prefetch)


def summary(timed: list[dict], secs: float, steps: int) -> dict:
    """Rates over the timed pass, from its batches' examples."""
    exs = [e for b in timed for e in examples(b)]
    useful = sum(int(m.sum()) for _, m in exs)
    return {"useful_tokens_per_s": useful / secs, "examples_per_min": 60 * len(exs) / secs, "pass_s": secs,
            "step_s": secs / steps, "examples": len(exs), "useful_tokens": useful}


def jax_side(recipe: str, a) -> dict:
    import jax

    from sftjax.build import build
    from sftjax.train.hooks import Hook
    from sftjax.train.loop import Loop, train_step
    from sftjax.train.step import init_state

    cfg, tok, data, plan = prepare(a, recipe)
    warm = 1 + a.warmup
    setup = build(cfg, tok)
    state, tx, sched = init_state(setup, cfg.optim, cfg.train.steps)

    class Timer(Hook):
        """Wall time after the compile step, after warm-up and at the end; the losses as they come."""

        def start(self, loop, state):
            self.t, self.stats = [time.perf_counter()], []

        def after_step(self, loop, done, state, metrics, batch):
            if not np.array_equal(batch["input_ids"], plan[done - 1]["input_ids"]):
                raise RuntimeError(f"step {done}: the loader's batch differs from the planned one")
            self.stats.append((metrics["loss"], metrics["tokens"]))
            if done in (1, warm, loop.steps):
                jax.block_until_ready(metrics)
                self.t.append(time.perf_counter())

    timer = Timer()
    loader = loader_for(cfg, tok, data)
    try:
        Loop(train_step(cfg, setup, tx, sched, state, 1), setup.frozen, loader, setup.mesh, cfg.train.steps,
             [timer], rules=setup.rules).run(state)
    finally:
        loader.close()
    t = timer.t
    out = summary(plan[warm:], t[-1] - t[-2], len(plan) - warm)
    loss, n = (np.array([float(x) for x in col]) for col in zip(*timer.stats, strict=True))
    out["first_step_s"] = t[1] - t[0]
    out["padded_tokens"] = sum(b["input_ids"].size for b in plan[warm:])
    out["loss0_mnat"] = 1000 * loss[0]
    out["loss_mnat"] = 1000 * float((loss[warm:] * n[warm:]).sum() / n[warm:].sum())
    return out


def torch_side(recipe: str, a) -> dict:
    import os
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from sftjax.io.load import embedded_model_path

    cfg, tok, _, plan = prepare(a, recipe)
    warm, b = 1 + a.warmup, cfg.train.batch_size
    feature = lambda ids, m: {"input_ids": ids.tolist(), "labels": np.where(m, ids, -100).tolist()}  # noqa: E731
    timed = [feature(*e) for p in plan[warm:] for e in examples(p)]
    warmup = [feature(*e) for p in plan[:warm] for e in examples(p)][: warm * b]  # one torch step per sftjax one
    tok.padding_side = "right"
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)

    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    model.hf_quantizer, model.is_quantized = None, False  # GGUF weights are dequantised to float32 on load; Trainer refuses the leftover flag
    lc, oc = cfg.lora, cfg.optim
    model = get_peft_model(model, LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                             target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # sftjax's first step's loss: its first batch, before any update
        loss0 = model(**collate([feature(*e) for e in examples(plan[0])])).loss.item()

    class Timer(TrainerCallback):
        def __init__(self):
            self.t, self.losses = {}, []

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warm, state.max_steps):
                self.t[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and state.global_step > warm:
                self.losses.append(logs["loss"])

    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=b, num_train_epochs=1, learning_rate=oc.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=oc.weight_decay, adam_beta1=oc.b1,
            adam_beta2=oc.b2, adam_epsilon=oc.eps, max_grad_norm=oc.clip_norm, logging_steps=1,
            save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=cfg.train.seed,
            train_sampling_strategy="sequential", dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=warmup + timed, data_collator=collate,
                          callbacks=[timer])
        trainer.train()
    steps = -(-len(timed) // b)
    out = summary(plan[warm:], timer.t[warm + steps] - timer.t[warm], steps)
    batches = [timed[i:i + b] for i in range(0, len(timed), b)]
    out["padded_tokens"] = sum(len(g) * max(len(f["input_ids"]) for f in g) for g in batches)
    targets = [sum(x != -100 for f in g for x in f["labels"]) for g in batches]
    out["loss0_mnat"] = 1000 * loss0
    out["loss_mnat"] = 1000 * float(np.dot(timer.losses, targets) / sum(targets))
    out["threads"] = torch.get_num_threads()
    return out


MEASURES = (Measure("useful_tokens_per_s", "target tokens/s", "rate"),
            Measure("examples_per_min", "examples/min", "rate"),
            Measure("pass_s", "timed pass (same examples)", "time", "s"),
            Measure("step_s", "s/step (packed vs padded)", "time", "s"),
            Measure("padded_tokens", "tokens computed incl. pad", "time"),
            Measure("examples", "examples timed", "info"),
            FIRST_STEP,
            Measure("loss0_mnat", "loss, first batch", "rate", "mnat"),
            Measure("loss_mnat", "loss, timed pass", "rate", "mnat"),
            PEAK_RSS)

CASES = {
    f"sft_{short}": Case(f"{name} SFT, assistant-only loss, LoRA r=8 q,v, float32, 8 per step, max 256 tokens; "
                         "sftjax packed vs Trainer + peft padded per batch",
                         functools.partial(jax_side, recipe), functools.partial(torch_side, recipe), MEASURES)
    for short, recipe, name in (("chat", "chitchat", "chitchat"), ("trec", "trec", "TREC question types"))
}
