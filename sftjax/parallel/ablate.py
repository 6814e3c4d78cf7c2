"""`sftjax ablate`: one training config over several mesh layouts, each in its own process.

Every layout runs `sftjax train` in a fresh process (so compile caches, allocator state and peak
memory are its own) with `--config.mesh.*` set, in `WORKDIR/mesh_DxFxT`, and writes its own
TensorBoard run there (point TensorBoard at WORKDIR to compare them). The runs' results.json
files become one table (ablation.md, ablation.csv): step time, tokens/s, MFU, compile time, peak
memory and the final loss. The layouts compute the same thing, so the losses must agree; the
table shows each loss's difference from the first layout's, and a disagreement beyond
`LOSS_RTOL` fails the command.

On a CPU-only machine the layouts run on simulated devices (XLA's host platform device count set
to the largest mesh): they share the same cores, so the table shows the tool, not the speed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

from sftjax.errors import UserError

LOSS_RTOL = 1e-4  # float32 layouts differ only by reduction order
COLUMNS = ("mesh", "s/step", "tokens/s", "MFU", "compile s", "peak memory GiB", "final loss", "loss diff")


def parse_meshes(text: str) -> list[tuple[int, int, int]]:
    """ "8,1,1 2,2,2" -> [(8, 1, 1), (2, 2, 2)] (data, fsdp, tensor)."""
    meshes = []
    for item in text.split():
        try:
            sizes = tuple(int(x) for x in item.split(","))
        except ValueError:
            sizes = ()
        if len(sizes) != 3 or min(sizes) < 1:
            raise UserError(f"--meshes: {item!r} is not DATA,FSDP,TENSOR (three positive sizes)")
        meshes.append(sizes)
    if not meshes:
        raise UserError("--meshes: give at least one layout, e.g. --meshes=\"8,1,1 2,2,2\"")
    return meshes


def _probe() -> tuple[str, int]:
    """(backend, device count) seen by a child process; probing in a child keeps this process from
    claiming accelerator memory the runs need."""
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend(), jax.device_count())"],
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


def _env(meshes) -> dict:
    env = dict(os.environ)
    backend, count = _probe()
    need = max(math.prod(m) for m in meshes)
    if backend == "cpu" and count < need:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={need}".strip()
    elif count < need:
        raise UserError(f"--meshes: a layout needs {need} devices but the {backend} backend has {count}")
    return env


def layout_dir(workdir: str, mesh) -> str:
    return os.path.join(workdir, "mesh_" + "x".join(map(str, mesh)))


def run_layout(config: str, overrides: list[str], mesh, steps: int, workdir: str, env: dict) -> dict:
    """Train one layout in its own process; its results.json (or the error it printed)."""
    name = "x".join(map(str, mesh))
    wd = layout_dir(workdir, mesh)
    d, f, t = mesh
    cmd = [sys.executable, "-m", "sftjax.cli", "train", f"--config={config}", f"--workdir={wd}", *overrides,
           f"--config.mesh.data={d}", f"--config.mesh.fsdp={f}", f"--config.mesh.tensor={t}",
           f"--config.train.steps={steps}", f"--config.checkpoint.every={steps}"]
    print(f"ablate: mesh {name}: {' '.join(cmd[1:])}", flush=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] or r.stderr.splitlines()[-1:]
        return {"mesh": name, "error": err[-1] if err else f"exit {r.returncode}"}
    with open(os.path.join(wd, "results.json")) as fh:
        return {"mesh": name, **json.load(fh)}


def _row(res: dict, first_loss: float | None) -> list[str]:
    if "error" in res:
        return [res["mesh"], *["-"] * (len(COLUMNS) - 2), res["error"]]
    f = lambda key, fmt: fmt.format(res[key]) if key in res else "-"  # noqa: E731
    loss = res.get("train_loss")
    diff = "-" if loss is None or first_loss is None else f"{loss - first_loss:+.2e}"
    peak = f"{res['peak_memory_bytes'] / 2**30:.2f}" + (" (host RSS)" if res.get("peak_memory_of") == "host_rss" else "")
    return [res["mesh"], f("train_step_secs", "{:.3f}"), f("train_tokens_per_sec", "{:.0f}"), f("train_mfu", "{:.2%}"),
            f("first_step_secs", "{:.1f}"), peak, f("train_loss", "{:.6f}"), diff]


def table(results: list[dict]) -> tuple[list[list[str]], bool]:
    """Rows of the table and whether every layout's final loss agrees with the first's."""
    ok = [r for r in results if "error" not in r]
    first = ok[0]["train_loss"] if ok else None
    agree = all(abs(r["train_loss"] - first) <= LOSS_RTOL * abs(first) for r in ok)
    return [_row(r, first) for r in results], agree


def ablate(config: str, overrides: list[str], meshes, steps: int, workdir: str) -> int:
    """Run every layout, write ablation.md / ablation.csv into `workdir`, print the table; the exit
    status is non-zero if a layout failed or the losses disagree."""
    for m in meshes:  # a layout run left in the workdir would resume instead of starting fresh
        if os.path.exists(layout_dir(workdir, m)):
            raise UserError(f"--workdir: {layout_dir(workdir, m)} exists (an earlier layout run); use a new --workdir")
    os.makedirs(workdir, exist_ok=True)
    env = _env(meshes)
    results = [run_layout(config, overrides, m, steps, workdir, env) for m in meshes]
    rows, agree = table(results)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] + ["| " + " | ".join(r) + " |" for r in rows]
    failed = [r["mesh"] for r in results if "error" in r]
    verdict = (f"losses agree within {LOSS_RTOL:g} (relative)" if agree else
               f"LOSSES DISAGREE beyond {LOSS_RTOL:g} (relative): the layouts do not compute the same step")
    text = "\n".join(md + ["", verdict] + ([f"failed layouts: {', '.join(failed)}"] if failed else []))
    with open(os.path.join(workdir, "ablation.md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(workdir, "ablation.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        w.writerows(rows)
    print(text)
    print(f"ablate: tables in {workdir}/ablation.md and ablation.csv; TensorBoard runs under {workdir}/mesh_*/tb")
    return 0 if agree and not failed else 1
