"""Orbax checkpoints of the train state (step, trainable params, optimizer state).

The frozen base is not saved: it is re-read from the model file on resume, so a LoRA checkpoint
holds only the adapters and their optimizer state. Restoring takes an abstract target carrying
the current shardings, so a run can resume onto a different mesh.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int):
        self.dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=True,
                                            create=True)
        self.manager = ocp.CheckpointManager(self.dir, options=opts, item_names=("state",))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

    def restore(self, step: int, like):
        """Restore into the structure, dtypes and shardings of `like` (a state or abstract state)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return out["state"]

    def close(self) -> None:
        """Wait for pending asynchronous saves, then release the manager (safe to call twice)."""
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None
