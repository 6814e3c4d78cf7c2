"""sftjax against PyTorch + transformers + peft, side by side, in one command.

    python bench/compare.py                 # every comparison, back to back
    python bench/compare.py --only lora_qv_fp32 --only load
    python bench/compare.py --steps 3 --json results.json

Each side of each comparison runs in its own fresh process (so its peak RSS and its warm-up are
its own), sftjax first, then torch, on the same shapes and data at matched precision. One line per
measure ends in the ratio, oriented so that higher is better for sftjax (`1.23x`: sftjax 23%
faster), except peak RSS, printed as sftjax/torch (lower is better). Comparisons live in
`bench/cases/` (one module per kind of work); each registers its cases in `CASES` below.
Absolute figures move between runs on shared machines: compare ratios from one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cases import CASES, Measure  # noqa: E402


def _side(a: argparse.Namespace) -> None:
    """Child process: run one side of one case, print its measures as JSON (last line)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    case = CASES[a.case]
    fn = case.jax if a.side == "jax" else case.torch
    out = fn(a)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(out), flush=True)


def _run(name: str, side: str, a: argparse.Namespace, argv: list[str]) -> dict | str:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--case", name, "--side", side]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return f"took longer than --timeout={a.timeout} s"
    if r.returncode:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        if tail[0].startswith("not run:"):  # the side says why it cannot run here
            return tail[0][:300]
        return f"failed (exit {r.returncode}): {tail[0][:300]}"
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"printed no result: {r.stdout[-300:]!r}"


def _fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.3g} s" if v < 10 else f"{v:.1f} s"
    if unit == "GiB":
        return f"{v:.2f} GiB"
    if unit == "%":
        return f"{v:.1%}"
    return (f"{v:.1f}" if v < 100 else f"{v:.0f}") + (f" {unit}" if unit else "")


def ratio(m: Measure, j: float, t: float) -> float | None:
    """sftjax's standing against torch on one measure (see the module docstring)."""
    if not j or not t:
        return None
    return {"rate": j / t, "time": t / j, "rss": j / t}[m.kind]


def report(name: str, case, j: dict | str, t: dict | str) -> list[str]:
    """Printed lines for one case, each `name  measure  sftjax X  torch Y  R x`."""
    lines = []
    for m in case.measures:
        jv = j.get(m.key) if isinstance(j, dict) else None
        tv = t.get(m.key) if isinstance(t, dict) and m.kind != "info" else None
        if jv is None and tv is None:
            continue
        text = f"{name:14s} {m.label:24s} sftjax {_fmt(jv, m.unit) if jv is not None else '-':>12s}"
        if m.kind != "info":
            text += f"  torch {_fmt(tv, m.unit) if tv is not None else '-':>12s}"
            r = ratio(m, jv, tv) if jv is not None and tv is not None else None
            if r is not None:
                text += f"  {r:.2f}x" + ("  (sftjax/torch, lower is better)" if m.kind == "rss" else "")
        lines.append(text)
    for side, res in (("sftjax", j), ("torch", t)):
        if isinstance(res, str):
            lines.append(f"{name:14s} {side} side {res}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=sorted(CASES), help="run only these (repeatable)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per training case (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compile) step")
    p.add_argument("--timeout", type=int, default=1200, help="seconds allowed per side")
    p.add_argument("--json", help="also write every raw figure here")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        _side(a)
        return
    names = a.only or list(CASES)
    argv = [f"--steps={a.steps}", f"--warmup={a.warmup}"]
    import jax
    import torch

    print(f"sftjax vs torch {torch.__version__} (jax {jax.__version__}) on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    raw = {}
    for name in names:
        case = CASES[name]
        print(f"# {name}: {case.what}", flush=True)
        j = _run(name, "jax", a, argv)
        t = _run(name, "torch", a, argv) if case.torch is not None else {}
        if isinstance(j, dict) and "flops_per_step" in j and isinstance(t, dict) and "step_s" in t:
            t["mfu"] = j["flops_per_step"] / t["step_s"] / j["peak_flops"]  # the same work, the same peak
        raw[name] = {"sftjax": j, "torch": t}
        print("\n".join(report(name, case, j, t)), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
