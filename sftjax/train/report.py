"""`sftjax eval`: every score a run's task has, for eval.json, TensorBoard and the console.

- causal_lm: held-out loss, perplexity, token accuracy, exact match, and the greedy replies to the
  first `generate` held-out conversations scored against the references (ROUGE-L, BLEU, exact
  match of the generated text);
- classification: accuracy, per-class precision/recall/F1, macro and weighted F1, the confusion
  matrix (printed, and as a TensorBoard image);
- token_classification: seqeval's entity-level report;
- with data.forgetting: the general data's perplexity under the base model and the tuned one.
"""

from __future__ import annotations

from sftjax.scores.classes import confusion_image, confusion_text, report_text
from sftjax.scores.text import text_scores
from sftjax.train.evaluate import evaluate, prompts_and_replies, samples
from sftjax.train.metrics import eval_line
from sftjax.train.predict import headline, predict, scores
from sftjax.train.step import make_eval_step, make_predict_step


def report(cfg, setup, data, trainable, step: int, writer, generate: int, max_new_tokens: int) -> tuple[dict, str]:
    """(scores for eval.json, the text to print) of `trainable` on `data`'s held-out examples."""
    batch = cfg.train.batch_size // cfg.train.grad_accum
    eval_step = make_eval_step(setup.model, len(data.names))
    out = evaluate(setup, eval_step, data.eval, trainable, batch, data.names)
    lines = []
    if setup.head is not None:
        s = scores(setup.head, predict(setup, make_predict_step(setup.model), data.eval, trainable, batch))
        out.update(headline(setup.head, s))
        if setup.head.kind == "classification":
            names = list(setup.head.names)
            out.update(per_class=s["per_class"], confusion=s["confusion"])
            lines += [report_text(s, names), confusion_text(s["confusion"], names)]
            writer.image(step, "eval/confusion", confusion_image(s["confusion"], names))
        else:
            out["per_type"] = s["per_type"]
            lines.append(s["report"])
    elif generate > 0:
        g = generation_scores(setup, trainable, data.eval_records[:generate], max_new_tokens)
        if g is None:  # e.g. plain-text data: nothing to compare a reply with
            lines.append("generation: not scored (the held-out records have no assistant reply)")
        else:
            out["generation"] = g
            lines.append(f"generation ({g['examples']} held-out replies, greedy, up to {max_new_tokens} tokens): "
                         f"ROUGE-L {g['rouge_l']:.4f}, BLEU {g['bleu']:.2f}, exact match {g['exact_match']:.1%}")
    if data.forgetting is not None:
        base = evaluate(setup, eval_step, data.forgetting, setup.trainable, batch)["perplexity"]
        tuned = evaluate(setup, eval_step, data.forgetting, trainable, batch)["perplexity"]
        out["forgetting"] = {"source": cfg.data.forgetting, "base_perplexity": base, "tuned_perplexity": tuned}
        lines.append(f"general data {cfg.data.forgetting}: perplexity {base:.2f} (base) -> {tuned:.2f} (tuned)")
    writer.scalars(step, {k: v for k, v in out.items() if isinstance(v, float)}, prefix="eval/")
    lines.insert(0, eval_line(f"at checkpoint step {step}", out))
    return out, "\n".join(lines)


def generation_scores(setup, trainable, records, max_new_tokens: int) -> dict | None:
    """Greedy replies to `records` cut before their last assistant turn, scored against that turn
    (None when no record has an assistant turn)."""
    pairs = prompts_and_replies(records)
    if not pairs:
        return None
    convs, refs = [c for c, _ in pairs], [r for _, r in pairs]
    preds = samples(setup, trainable, convs, max_new_tokens)
    out = {**text_scores(preds, refs), "examples": len(pairs)}
    out["samples"] = [{"prompt": c[-1]["content"], "reference": r, "output": p}
                      for c, r, p in zip(convs[:5], refs, preds, strict=False)]
    return out
