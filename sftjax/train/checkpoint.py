"""Orbax checkpoints of the train state (step, trainable params, optimizer state) and of the
training data iterator's position, in the same step directory.

The frozen base is not saved: it is re-read from the model file on resume, so a LoRA checkpoint
holds only the adapters and their optimizer state. Restoring takes an abstract target carrying
the current shardings, so a run can resume onto a different mesh.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int):
        self.dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=True,
                                            create=True)
        self.manager = ocp.CheckpointManager(self.dir, options=opts, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data=None) -> None:
        """Save `state` and, if given, the data iterator's state (grain, one file per process)."""
        if step in self.manager.all_steps():
            return
        items = {"state": ocp.args.StandardSave(state)}
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, step: int, like, data=None):
        """Restore into the structure, dtypes and shardings of `like` (a state or abstract state);
        `data`, an iterator, is moved to the saved position in place."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"]

    def close(self) -> None:
        """Wait for pending asynchronous saves, then release the manager (safe to call twice)."""
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None


def latest_trainable(workdir: str, setup, cfg) -> dict:
    """The trained parameters of `workdir`'s latest checkpoint, sharded like `setup.trainable`."""
    from sftjax.errors import UserError
    from sftjax.train.step import init_state

    ckpt = Checkpointer(workdir, cfg.checkpoint.max_to_keep)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"--workdir: no checkpoint in {ckpt.dir}; train first")
        return ckpt.restore(step, init_state(setup, cfg.optim, cfg.train.steps)[0]).trainable
    finally:
        ckpt.close()
