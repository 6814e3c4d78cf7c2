"""The optimizer: clip by global norm -> AdamW | Adafactor | Lion with a path-masked weight decay -> schedule.

Weight decay is decoupled and scaled by the learning rate for all three (lr * wd * param, as in
AdamW), and skips the paths matching `optim.no_decay`. Usual settings: lr 1e-5..5e-5 for full
fine-tuning, 1e-4..3e-4 for LoRA (Lion: 3-10x lower than AdamW); wd 0.01; betas 0.9/0.999;
eps 1e-8. Adafactor uses an absolute step size (no parameter-scale multiplication), factored
second moments for matrices with both sides >= 128 and no momentum, so it keeps far less state;
Lion keeps one moment (half of AdamW's state).

Option names are checked once, by `config.validate`. It is built over the *trainable* subtree only, so frozen parameters hold no optimizer state at
all (and receive no gradients: `step.py` differentiates only the trainable subtree).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import optax

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
    else:  # constant
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(cfg, trainable: Mapping, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip -> optim.name (wd masked off paths matching optim.no_decay) with the schedule."""
    sched = schedule(cfg, total_steps)
    no_decay = [re.compile(p) for p in cfg.no_decay]
    decay = mask_tree(trainable, lambda path: not any(p.search(path) for p in no_decay))
    if cfg.name == "adamw":
        opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay)
    elif cfg.name == "lion":
        opt = optax.lion(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay)
    else:  # adafactor
        # optax adds Adafactor's decay after the learning rate: scale it by the schedule ourselves.
        opt = optax.adafactor(sched, multiply_by_parameter_scale=False,
                              weight_decay_rate=lambda step: cfg.weight_decay * sched(step),
                              weight_decay_mask=decay)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(), opt)
    return tx, sched
