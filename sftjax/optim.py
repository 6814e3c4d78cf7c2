"""The optimizer: clip by global norm -> AdamW with a path-masked weight decay -> schedule.

It is built over the *trainable* subtree only, so frozen parameters hold no optimizer state at
all (and receive no gradients: `step.py` differentiates only the trainable subtree).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import optax

from sftjax.errors import UserError
from sftjax.params import mask_tree


def schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine or linear decay to lr * min_lr_ratio (or constant)."""
    warmup = int(cfg.warmup_steps) if cfg.warmup_steps >= 0 else int(cfg.warmup_ratio * total_steps)
    warmup = min(warmup, max(total_steps - 1, 0))
    peak, end = cfg.lr, cfg.lr * cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise UserError(f"optim.schedule: {cfg.schedule!r} is not one of cosine, linear, constant")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(cfg, trainable: Mapping, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip -> AdamW(b1, b2, eps, wd masked off paths matching optim.no_decay) with the schedule."""
    sched = schedule(cfg, total_steps)
    no_decay = [re.compile(p) for p in cfg.no_decay]
    decay = mask_tree(trainable, lambda path: not any(p.search(path) for p in no_decay))
    if cfg.name != "adamw":
        raise UserError(f"optim.name: {cfg.name!r} is not supported (adamw)")
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay),
    )
    return tx, sched
