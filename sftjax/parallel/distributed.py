"""Joining a multi-process run (`sftjax train --distributed`) with jax.distributed."""

from __future__ import annotations

import logging
import os

from sftjax.errors import UserError


def initialize() -> None:
    """jax.distributed.initialize() from SFTJAX_COORDINATOR, SFTJAX_NUM_PROCESSES and
    SFTJAX_PROCESS_ID (see launch/local.sh) if set, else the cluster's own auto-detection (SLURM,
    TPU pods). Must run before anything else touches jax's devices."""
    import jax

    env = os.environ
    if "SFTJAX_COORDINATOR" in env:
        try:
            n, pid = int(env["SFTJAX_NUM_PROCESSES"]), int(env["SFTJAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise UserError("--distributed: SFTJAX_COORDINATOR is set, so SFTJAX_NUM_PROCESSES and "
                            "SFTJAX_PROCESS_ID must be integers too") from None
        jax.distributed.initialize(coordinator_address=env["SFTJAX_COORDINATOR"], num_processes=n, process_id=pid)
    else:
        jax.distributed.initialize()
    logging.getLogger("sftjax").info("process %d of %d, %d local / %d global devices", jax.process_index(),
                                     jax.process_count(), jax.local_device_count(), jax.device_count())
