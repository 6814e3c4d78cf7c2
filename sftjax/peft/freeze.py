"""Freezing strategies as path-regex rules, and the scanned <-> unrolled layer layouts.

Every strategy ends up as a list of regexes over parameter paths (`params.matching`), so "what
trains" is always one filter, printed at start with the trainable count. Layer-wise rules need
one subtree per layer: with `model.scan_layers=False` the decoder is unrolled into
`layers_0 .. layers_{L-1}` and "the last N layers" is the regex `^layers_(L-N|..|L-1)/`.
Weights are read and written stacked (`layers/...` with a leading layer axis); `unstack` and
`stack` convert between the two layouts, losslessly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from sftjax.errors import UserError
from sftjax.params import flatten, unflatten

_UNROLLED = re.compile(r"^layers_(\d+)/(.*)$")


def unstack(params: Mapping, num_layers: int) -> dict:
    """`layers/P` [L, ...] -> `layers_i/P` [...] for i < L; other leaves unchanged."""
    out = {}
    for path, v in flatten(params).items():
        if path.startswith("layers/"):
            rest = path[len("layers/"):]
            for i in range(num_layers):
                out[f"layers_{i}/{rest}"] = v[i]
        else:
            out[path] = v
    return unflatten(out)


def stack(params: Mapping) -> dict:
    """Inverse of `unstack` (a no-op on an already stacked tree)."""
    flat = flatten(params)
    per: dict[str, dict[int, object]] = {}
    out = {}
    for path, v in flat.items():
        m = _UNROLLED.match(path)
        if m:
            per.setdefault(m.group(2), {})[int(m.group(1))] = v
        else:
            out[path] = v
    for rest, layers in per.items():
        n = len(layers)
        if sorted(layers) != list(range(n)):
            raise ValueError(f"layers_*/{rest}: layers {sorted(layers)} are not 0..{n - 1}")
        vals = [layers[i] for i in range(n)]
        xp = np if all(isinstance(x, np.ndarray) for x in vals) else jnp
        out[f"layers/{rest}"] = xp.stack(vals)
    return unflatten(out)


def head_patterns(tied: bool) -> list[str]:
    """The output head and the final norm (a tied head is the input embedding)."""
    return [r"^norm/", r"^embed_tokens/" if tied else r"^lm_head/"]


def trainable_patterns(train_cfg, num_layers: int, tied: bool, scan_layers: bool) -> list[str]:
    """Regexes of trainable parameters for `train.freeze` (without LoRA / prompt tuning)."""
    kind = train_cfg.freeze
    if kind == "full":
        return [".*"]
    if kind == "head":
        return head_patterns(tied)
    if kind == "last_layers":
        n = int(train_cfg.last_layers)
        if not 0 < n <= num_layers:
            raise UserError(f"train.last_layers: must be in 1..{num_layers} (the model's layer count), got {n}")
        if scan_layers:
            raise UserError("train.freeze=last_layers: needs one subtree per layer; set "
                            "--config.model.scan_layers=False")
        layers = "|".join(str(i) for i in range(num_layers - n, num_layers))
        return [rf"^layers_({layers})/"] + head_patterns(tied)
    if kind == "regex":
        if not train_cfg.trainable:
            raise UserError("train.trainable: train.freeze=regex needs at least one regex")
        return list(train_cfg.trainable)
    raise UserError(f"train.freeze: {kind!r} is not one of full, head, last_layers, regex")
