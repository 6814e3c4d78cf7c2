"""The two layouts of the decoder's layer weights, and conversion between them.

Stacked (`model.scan_layers=True`): one `layers/P` leaf per weight with a leading layer axis.
Unrolled: `layers_0/P .. layers_{L-1}/P`, one subtree per layer, so per-layer rules ("train the
last N layers") are plain path regexes. Weights are read and written stacked; `unstack` and
`stack` convert, losslessly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from sftjax.params import flatten, unflatten

STACKED = "layers/"
UNROLLED = re.compile(r"^layers_(\d+)/(.*)$")
LAYER = r"^layers(_\d+)?/"  # any decoder-layer path, in either layout


def unrolled_pattern(layers) -> str:
    """A path regex for the given layer numbers in the unrolled layout."""
    return rf"^layers_({'|'.join(str(i) for i in layers)})/"


def per_layer(stacked, scan_layers: bool) -> dict:
    """A value stacked over layers [L, ...] -> {layer subtree name: its value} in either layout."""
    if scan_layers:
        return {STACKED[:-1]: stacked}
    return {f"layers_{i}": stacked[i] for i in range(len(stacked))}


def unstack(params: Mapping, num_layers: int) -> dict:
    """`layers/P` [L, ...] -> `layers_i/P` [...] for i < L; other leaves unchanged."""
    out = {}
    for path, v in flatten(params).items():
        if path.startswith(STACKED):
            for i in range(num_layers):
                out[f"layers_{i}/{path[len(STACKED):]}"] = v[i]
        else:
            out[path] = v
    return unflatten(out)


def stack(params: Mapping) -> dict:
    """Inverse of `unstack` (a no-op on an already stacked tree)."""
    per: dict[str, dict[int, object]] = {}
    out = {}
    for path, v in flatten(params).items():
        m = UNROLLED.match(path)
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
        out[f"{STACKED}{rest}"] = xp.stack(vals)
    return unflatten(out)


def layer_modules(module: str, num_layers: int) -> list[tuple[int | None, int | None, str]]:
    """A module path -> [(index into its leading layer axis or None, layer number or None, the
    path inside the layer)]: `layers/x` is every layer, `layers_i/x` layer i, anything else no layer."""
    if module.startswith(STACKED):
        return [(i, i, module[len(STACKED):]) for i in range(num_layers)]
    m = UNROLLED.match(module)
    if m:
        return [(None, int(m.group(1)), m.group(2))]
    return [(None, None, module)]
