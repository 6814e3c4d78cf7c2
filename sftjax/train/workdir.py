"""The files of a run's workdir besides checkpoints: its config and its results (JSON, written atomically)."""

from __future__ import annotations

import json
import logging
import os
import tempfile

from sftjax import config as C
from sftjax.errors import UserError

log = logging.getLogger("sftjax")
CONFIG = "sftjax_config.json"
RESULTS = "results.json"


def check_writable(path: str, key: str) -> None:
    """Make sure `path` is (or can become) a folder this process can write in, before anything slow.

    A run used to find a bad workdir only after loading data and model and compiling the step;
    this fails first, naming the flag. The folder is created if missing (as the run would), and a
    temporary file (unique per process, so every process of a multi-process run can check the
    same folder) is written and removed, which catches read-only mounts that permission bits miss.

    Args:
        path: the folder, e.g. --workdir or export's --out.
        key: how the user named it, put first in the message.

    Raises:
        UserError: `path` is an existing file, or cannot be created or written.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{key}: {path} is an existing file, not a folder; give a folder path")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sftjax-write-check-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{key}: cannot write in {path} ({e.strerror or e}); choose a folder you can write to") from None


def read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    """Write-then-rename, so a crash never leaves a truncated file behind."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def write_config(cfg, workdir: str) -> None:
    """Save the run's config (generate/export rebuild from it); warn when a resumed run changed it,
    since e.g. a new train.steps reshapes the learning-rate schedule mid-run."""
    path = os.path.join(workdir, CONFIG)
    new = json.loads(C.to_json(cfg))
    old = read_json(path)
    if old is not None:
        changed = [f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
        if changed:
            log.warning("%s: this workdir was run with a different config before; changed: %s", path,
                        ", ".join(changed))
    write_json(path, new)


def read_config(workdir: str):
    """The validated config a workdir was trained with."""
    path = os.path.join(workdir, CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"--workdir: {path} not found; run `sftjax train --workdir={workdir} ...` first")
    with open(path) as f:
        return C.from_json(f.read())
