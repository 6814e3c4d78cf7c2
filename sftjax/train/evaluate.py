"""Held-out evaluation and sample generations, as the loop's hooks run them."""

from __future__ import annotations

import os

import numpy as np

from sftjax.infer.generate import chat
from sftjax.parallel.mesh import place_batch


def evaluate(setup, eval_step, examples, trainable, batch_size: int, names: list[str] = (),
             predict_step=None, general=None) -> dict:
    """Held-out loss, perplexity, token accuracy and exact match (every target token argmax-correct,
    i.e. greedy decoding would reproduce the whole reply); with several sources, each one's loss.
    With a task head and its `predict_step`, also its headline scores (accuracy and macro F1, or
    entity F1). With `general` examples (data.forgetting) also their perplexity, `general_perplexity`."""
    n = len(examples)
    totals: dict[str, float | np.ndarray] = {}
    for s in range(0, n, batch_size):
        rows = np.arange(s, s + batch_size)
        batch = examples.batch(np.minimum(rows, n - 1))
        batch["weights"] = batch["weights"] * (rows < n)[:, None]  # padding rows count for nothing
        stats = eval_step(trainable, setup.frozen, place_batch(batch, setup.mesh, rules=setup.rules))
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
    loss = float(totals["loss_sum"] / max(totals["tokens"], 1))
    out = {"loss": loss, "perplexity": float(np.exp(loss)),
           "token_accuracy": float(totals["correct"] / max(totals["tokens"], 1)),
           "exact_match": float(totals["exact"] / max(totals["rows"], 1)), "examples": int(totals["rows"])}
    out.update(per_source(totals, names))
    if general is not None:
        out["general_perplexity"] = evaluate(setup, eval_step, general, trainable, batch_size)["perplexity"]
    if predict_step is not None and setup.head is not None:
        from sftjax.train.predict import headline, predict, scores

        out.update(headline(setup.head, scores(setup.head, predict(setup, predict_step, examples, trainable,
                                                                    batch_size))))
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


def sample_conversations(train_cfg, eval_records) -> list[list[dict]]:
    """Free prompts from train.sample_prompts, then the first train.sample_eval held-out
    conversations cut before their last assistant turn."""
    convs = [[{"role": "user", "content": p}] for p in train_cfg.sample_prompts]
    return convs + [c for c, _ in prompts_and_replies(eval_records[: train_cfg.sample_eval])]


def prompts_and_replies(records) -> list[tuple[list[dict], str]]:
    """(conversation up to the last assistant turn, that turn's text) of each chat record (records
    without an assistant turn, e.g. plain text, are skipped)."""
    out = []
    for rec in records:
        turns = [i for i, m in enumerate(rec.messages) if m["role"] == "assistant"]
        if turns:
            out.append((list(rec.messages[: turns[-1]]), rec.messages[turns[-1]]["content"]))
    return out


def samples(setup, trainable, convs, max_new_tokens: int) -> list[str]:
    if not convs:
        return []
    return chat(setup.model, setup.full_params(trainable), setup.tokenizer, convs, max_new_tokens)
