"""Path-regex rules over the param tree: which leaves train, which decay.

Paths are '/'-joined keys, e.g. `layers/self_attn/q_proj/kernel` (layer weights are stacked, so
one path covers every layer). Rules are Python regexes matched with `re.search`. A rule that
matches nothing raises: a typo in a freezing rule must never silently freeze (or train) the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

from sftjax.errors import UserError


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def merge(a: Mapping, b: Mapping) -> dict:
    """Union of two param trees with disjoint leaves (e.g. frozen base + trainable adapters)."""
    return unflatten(flatten(a) | flatten(b))


def matching(paths: Iterable[str], patterns: Iterable[str], key: str) -> set[str]:
    """Paths matched by any pattern; a pattern that matches no path raises naming config `key`."""
    paths = list(paths)
    chosen: set[str] = set()
    for pat in patterns:
        try:
            hits = {p for p in paths if re.search(pat, p)}
        except re.error as e:
            raise UserError(f"{key}: {pat!r} is not a valid regex ({e})") from None
        if not hits:
            raise UserError(f"{key}: pattern {pat!r} matches no parameter; paths look like: "
                            + ", ".join(sorted(paths)[:6]))
        chosen |= hits
    return chosen


def split(params: Mapping, trainable: set[str]) -> tuple[dict, dict]:
    """(trainable, frozen) subtrees by path set."""
    flat = flatten(params)
    return (unflatten({p: v for p, v in flat.items() if p in trainable}),
            unflatten({p: v for p, v in flat.items() if p not in trainable}))


def mask_tree(tree: Mapping, pred: Callable[[str], bool]) -> dict:
    """A tree of booleans, one per leaf, from a predicate on the leaf's path."""
    return unflatten({p: pred(p) for p in flatten(tree)})


def count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
