"""The comparisons of `bench/compare.py`: each case is one kind of work done by both sides.

A case has a `jax` and a `torch` function (argparse namespace -> {measure key: value}), each run
in a fresh process, and the measures to print. `kind` orients the ratio: "rate" (sftjax/torch,
higher is better), "time" (torch/sftjax, so higher is better too), "rss" (sftjax/torch, lower is
better), "info" (sftjax only, no ratio). Every side also reports `peak_rss_gib`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    kind: str  # rate | time | rss | info
    unit: str = ""


@dataclass(frozen=True)
class Case:
    what: str
    jax: Callable[..., dict]
    torch: Callable[..., dict] | None
    measures: tuple[Measure, ...]


PEAK_RSS = Measure("peak_rss_gib", "peak RSS", "rss", "GiB")
# The first training step: compilation plus the step itself (sftjax only).
FIRST_STEP = Measure("first_step_s", "first step (compile + step)", "info", "s")


def timed(call: Callable[[], object], a) -> tuple[float, float, object]:
    """(seconds of the first call (compile, warm-up), mean seconds of `a.steps` calls after
    `a.warmup` untimed ones, the first call's result); `call` returns when its work is done."""
    import time

    t = time.perf_counter()
    first = call()
    first_s = time.perf_counter() - t
    for _ in range(a.warmup):
        call()
    t = time.perf_counter()
    for _ in range(a.steps):
        call()
    return first_s, (time.perf_counter() - t) / a.steps, first

# Modules holding cases, in the order `compare.py` runs them; each has a `CASES` dict.
MODULES = ("steps", "chat", "load", "decode", "peak")


def _collect() -> dict[str, Case]:
    import importlib
    import os

    here = os.path.dirname(__file__)
    cases: dict[str, Case] = {}
    for name in MODULES:
        if os.path.exists(os.path.join(here, f"{name}.py")):
            cases.update(importlib.import_module(f"bench.cases.{name}").CASES)
    return cases


CASES = _collect()
