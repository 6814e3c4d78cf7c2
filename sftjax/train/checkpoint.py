"""Orbax checkpoints of the train state (step, trainable params, optimizer state), the training
data iterator's position and a small JSON record (the base model's fingerprint, the step's eval
metrics), in the same step directory.

The frozen base is not saved: it is re-read from the model file on resume, so a LoRA checkpoint
holds only the adapters and their optimizer state; the recorded fingerprint makes a resume or an
export on a different base an error instead of a silent mix. Restoring takes an abstract target
carrying the current shardings, so a run can resume onto a different mesh.

Kept: the latest `checkpoint.max_to_keep` steps, plus the best one by `checkpoint.best_metric`.
A step that cannot be read (truncated, corrupt) is moved to `workdir/corrupt_checkpoints/` with a
warning and the next older one is used; nothing is ever deleted because a newer step is broken.
"""

from __future__ import annotations

import logging
import math
import os
import time

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from sftjax.errors import UserError

log = logging.getLogger("sftjax")
CORRUPT = "corrupt_checkpoints"


class Checkpointer:
    """`ckpt_cfg`: the config's `checkpoint` section; `base`: `io.load.base_fingerprint` of the
    model being trained (None: do not check or record)."""

    def __init__(self, workdir: str, ckpt_cfg, base: dict | None = None):
        self.workdir, self.base = os.path.abspath(workdir), base
        self.dir = os.path.join(self.workdir, "checkpoints")
        self.metric, self.mode = ckpt_cfg.best_metric, ckpt_cfg.best_mode
        self.every_secs, self.last_save = ckpt_cfg.every_minutes * 60, time.monotonic()
        keep = [policies.LatestN(n=ckpt_cfg.max_to_keep)]
        if self.metric:
            keep.append(policies.BestN(get_metric_fn=self._score, reverse=self.mode == "min", n=1,
                                       keep_checkpoints_without_metrics=False))
        opts = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, create=True,
                                            best_fn=self._score if self.metric else None, best_mode=self.mode,
                                            preservation_policy=policies.AnyPreservationPolicy(keep))
        self.manager = ocp.CheckpointManager(self.dir, options=opts, item_names=("state", "data", "meta"))

    def _score(self, metrics: dict) -> float:
        """The tracked metric of a step's metrics; steps saved without an evaluation rank last."""
        worst = math.inf if self.mode == "min" else -math.inf
        return metrics.get(self.metric, worst) if metrics else worst

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def due(self) -> bool:
        """checkpoint.every_minutes has passed since the last save (decided by process 0 for all)."""
        if not self.every_secs:
            return False
        late = time.monotonic() - self.last_save >= self.every_secs
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            late = bool(multihost_utils.broadcast_one_to_all(late))
        return late

    def save(self, step: int, state, data=None, metrics: dict | None = None) -> None:
        """Save `state`, the data iterator's state (grain, one file per process) if given, and
        `metrics` (the step's evaluation, ranked by checkpoint.best_metric)."""
        if step in self.manager.all_steps():
            return
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave({"base": self.base, "metrics": metrics})}
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data)
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=(metrics or {}) if self.metric else None)
        self.last_save = time.monotonic()

    def meta(self, step: int) -> dict:
        """The step's JSON record ({} for checkpoints written before sftjax recorded one)."""
        path = os.path.join(self.dir, str(step), "meta")
        if not os.path.isdir(path):
            return {}
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}

    def check_base(self, step: int, meta: dict | None = None) -> None:
        """UserError when checkpoint `step` was trained on another base than this run's."""
        saved = (meta if meta is not None else self.meta(step)).get("base")
        if self.base is None or not saved or saved["fingerprint"] == self.base["fingerprint"]:
            return
        raise UserError(f"model.path: {self.dir}/{step} was trained on the base {saved['path']} (fingerprint "
                        f"{saved['fingerprint']}), but this run's base is {self.base['path']} (fingerprint "
                        f"{self.base['fingerprint']}); use the original base, or a new --workdir")

    def check_newest_base(self) -> None:
        """`check_base` on the newest step whose record reads, before anything slow loads."""
        for step in reversed(self.steps()):
            try:
                meta = self.meta(step)
            except Exception:  # noqa: BLE001 - a broken step is reported (and skipped) by restore_newest
                continue
            return self.check_base(step, meta)

    def restore(self, step: int, like, data=None):
        """Restore into the structure, dtypes and shardings of `like` (a state or abstract state);
        `data`, an iterator, is moved to the saved position in place."""
        self.check_base(step)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_newest(self, like, data=None, steps: list[int] | None = None):
        """(step, state) of the newest readable step of `steps` (default: all), or (None, None)
        when there is none at all. Unreadable steps are moved aside with a warning naming what was
        wrong; if none reads, a UserError lists them."""
        broken = []
        for step in reversed(steps if steps is not None else self.steps()):
            try:
                return step, self.restore(step, like, data)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read a step means the step is unusable
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                broken.append(f"{step} ({why})")
                self._set_aside(step, why)
        if broken:
            raise UserError(f"--workdir: no readable checkpoint in {self.dir}: {'; '.join(broken)}. The broken ones "
                            f"are in {os.path.join(self.workdir, CORRUPT)}; start a new --workdir")
        return None, None

    def _set_aside(self, step: int, why: str) -> None:
        src = os.path.join(self.dir, str(step))
        dst = os.path.join(self.workdir, CORRUPT, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0 and os.path.isdir(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)
        log.warning("checkpoint %s cannot be read (%s); moved to %s, trying the one before", src, why, dst)
        self.manager.reload()

    def best(self) -> tuple[int, float] | None:
        """(step, value) of the best kept checkpoint by checkpoint.best_metric, or None."""
        found = []
        for step in self.steps():
            try:
                value = (self.meta(step).get("metrics") or {}).get(self.metric)
            except Exception:  # noqa: BLE001 - unreadable steps are not candidates
                continue
            if self.metric and value is not None:
                found.append((step, value))
        if not found:
            return None
        return (min if self.mode == "min" else max)(found, key=lambda sv: sv[1])

    def close(self) -> None:
        """Wait for pending asynchronous saves, then release the manager (safe to call twice)."""
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None


def pick(ckpt: Checkpointer, which: str, prefer_best: bool = False) -> list[int]:
    """The steps to try for `--checkpoint=which`, newest first: latest (every step, falling back
    past unreadable ones), best (checkpoint.best_metric's), auto (best when `prefer_best`, i.e. the
    run stopped early, and one exists; else latest) or a step number."""
    steps = ckpt.steps()
    if not steps:
        raise UserError(f"--workdir: no checkpoint in {ckpt.dir}; train first")
    if which == "auto":
        which = "best" if prefer_best and ckpt.best() is not None else "latest"
    if which == "latest":
        return steps
    if which == "best":
        best = ckpt.best() if ckpt.metric else None
        if best is None:
            raise UserError("--checkpoint=best: this run tracked no best checkpoint (it needs "
                            "checkpoint.best_metric and train.eval_every); use latest or a step: "
                            f"{', '.join(map(str, steps))}")
        return [best[0]]
    if not which.isdigit() or int(which) not in steps:
        raise UserError(f"--checkpoint={which}: not latest, best or a kept step ({', '.join(map(str, steps))})")
    return [int(which)]


def trainable_at(workdir: str, setup, cfg, which: str = "latest", prefer_best: bool = False) -> tuple[int, dict]:
    """(step, trained parameters sharded like `setup.trainable`) of `workdir`'s checkpoint `which`
    (see `pick`), after checking it was trained on this base."""
    from sftjax.io.load import base_fingerprint
    from sftjax.train.step import init_state

    ckpt = Checkpointer(workdir, cfg.checkpoint, base_fingerprint(cfg.model.path))
    try:
        steps = pick(ckpt, which, prefer_best)
        step, state = ckpt.restore_newest(init_state(setup, cfg.optim, cfg.train.steps)[0], steps=steps)
        return step, state.trainable
    finally:
        ckpt.close()
