"""TensorBoard (tensorboardX, no TensorFlow): scalars, text and the run's hyper-parameters; the
process's memory readings; and the console lines a run prints (one per evaluation, a summary at
the end), kept here as plain functions so they can be tested without a run."""

from __future__ import annotations

import json
import os
import resource
import sys

import jax

# Tags the HPARAMS tab shows beside each run's config (TensorBoard reads their values from the run's scalars).
HPARAM_METRICS = ("eval/loss", "eval/perplexity", "eval/token_accuracy", "eval/exact_match", "train/loss")


class Writer:
    """Scalars, text and hyper-parameters to `workdir/tb`; only process 0 writes."""

    def __init__(self, workdir: str):
        self.tb = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(logdir=os.path.join(workdir, "tb"), flush_secs=10)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}{k}", float(v), step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def image(self, step: int, tag: str, image) -> None:
        """An HxWx3 uint8 image (e.g. a confusion matrix)."""
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def hparams(self, cfg, metrics: tuple[str, ...] = HPARAM_METRICS) -> None:
        """The flattened config for TensorBoard's HPARAMS tab, so runs under one logdir compare by
        config. Written into the scalars' own event folder: `SummaryWriter.add_hparams` would open a
        new timestamped subfolder, a second run whose metrics the tab could not find."""
        if self.tb is not None:
            from tensorboardX.summary import hparams

            for summary in hparams(flat_config(cfg), dict.fromkeys(metrics, 0.0)):  # experiment, start, end
                self.tb.file_writer.add_summary(summary)

    def close(self) -> None:
        """Flush and close (safe to call twice)."""
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


def flat_config(cfg) -> dict[str, str | int | float | bool]:
    """`section.key` -> value, in the types the HPARAMS plugin takes: tuples become text (`q,v`, or
    JSON when nested) and None "None", so every run of the schema has the same columns."""
    out: dict[str, str | int | float | bool] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (list, tuple)):
                flat = all(isinstance(x, (str, int, float, bool)) for x in v)
                out[prefix + k] = ",".join(map(str, v)) if flat else json.dumps(v, default=list)
            else:
                out[prefix + k] = v if isinstance(v, (str, int, float, bool)) else str(v)

    walk(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg, "")
    return out


def memory() -> dict[str, float]:
    """This process's resident set now and at its peak, and the first local device's bytes in use
    and peak where the backend reports them (GPU, TPU: CPU reports nothing, its memory is the
    host's). Read at logging time: a leak or a creeping cache shows as a slope, not as an OOM."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    out = {"host_rss_peak_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)}
    try:
        with open("/proc/self/statm") as f:  # Linux; elsewhere only the peak
            out["host_rss_bytes"] = float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        out["host_rss_peak_bytes"] = max(out["host_rss_peak_bytes"], out["host_rss_bytes"])  # the peak lags a little
    except (OSError, ValueError, IndexError):
        pass
    stats = jax.local_devices()[0].memory_stats() or {}
    for key, tag in (("bytes_in_use", "device_bytes_in_use"), ("peak_bytes_in_use", "device_peak_bytes_in_use")):
        if key in stats:
            out[tag] = float(stats[key])
    return out


def eval_line(when: str, ev: dict, best: dict | None = None) -> str:
    """One console line per evaluation: the metrics worth reading at a glance (per-source losses
    and the rest go to TensorBoard), and the tracked best so far. `best`: {"metric", "value", "step"}."""
    parts = [f"loss {ev['loss']:.4f}"]
    heads = [(k, label) for k, label in (("accuracy", "accuracy"), ("macro_f1", "macro F1"), ("f1", "entity F1"),
                                         ("precision", "P"), ("recall", "R")) if k in ev]
    if heads:  # a task head: its scores say more than perplexity
        parts += [f"{label} {ev[k]:.1%}" for k, label in heads]
    elif "perplexity" in ev:
        parts.append(f"ppl {ev['perplexity']:.2f}")
    if "token_accuracy" in ev and not heads:
        parts.append(f"token acc {ev['token_accuracy']:.1%}")
    if "exact_match" in ev and not heads:
        parts.append(f"exact match {ev['exact_match']:.1%}")
    if "general_perplexity" in ev:
        parts.append(f"general ppl {ev['general_perplexity']:.2f}")
    line = f"eval {when}: " + ", ".join(parts)
    if "examples" in ev:
        line += f" ({ev['examples']} examples)"
    if best:
        line += f"; best {best['metric']} {best['value']:.4f} at step {best['step']}"
    return line


def summary(results: dict, workdir: str, done: int, total: int, secs: float) -> str:
    """The run's closing lines: how far it got and in what time, the final train loss, the best
    checkpoint, why it stopped early, and where the checkpoints and TensorBoard events are."""
    head = f"run summary: {done}/{total} steps in {duration(secs)}"
    if "train_loss" in results:
        head += f", final train loss {results['train_loss']:.4f}"
    lines = [head]
    if best := results.get("best"):
        lines.append(f"  best: eval {best['metric']} {best['value']:.4f} at step {best['step']}")
    if stopped := results.get("stopped"):
        lines.append(f"  stopped early: {stopped}")
    lines.append(f"  checkpoints: {results.get('checkpoints') or os.path.join(workdir, 'checkpoints')}")
    lines.append(f"  tensorboard: tensorboard --logdir {os.path.join(workdir, 'tb')}")
    return "\n".join(lines)


def duration(secs: float) -> str:
    """12.3 s, 4m05s, 2h03m."""
    if secs < 60:
        return f"{secs:.1f} s"
    m, s = divmod(int(secs), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"
