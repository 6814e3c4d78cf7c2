"""TensorBoard (tensorboardX, no TensorFlow) and the console progress line."""

from __future__ import annotations

import os

import jax


class Writer:
    """Scalars and text to `workdir/tb`; only process 0 writes."""

    def __init__(self, workdir: str):
        self.tb = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(logdir=os.path.join(workdir, "tb"), flush_secs=10)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}{k}", float(v), step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        """Flush and close (safe to call twice)."""
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
