"""Layouts change where numbers live, never the numbers: every mesh trains like one device.

On the 8 simulated CPU devices, five meshes x three methods (LoRA, full fine-tuning, QLoRA) give
the loss and the updated parameters of a 1-device run (<= 1e-5), each compiling once; rules from
the config move parameters; a checkpoint written on (2,2,2) resumes on 1 device and on (1,8,1).
"""

import os
import shutil

import jax
import numpy as np
import optax
import pytest
from helpers import CountingModel, file_batches, init_state
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sftjax.build import build
from sftjax.config import apply_override, validate
from sftjax.errors import UserError
from sftjax.parallel.mesh import place_batch
from sftjax.params import flatten
from sftjax.train.loop import run
from sftjax.train.step import make_train_step

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (2, 1, 4), (1, 2, 4)]


def _train(cfg, mesh, steps=2):
    """(params before, params after `steps` SGD steps, losses, the final state). SGD with lr 1 makes
    the update exactly minus the gradient, so comparing updates compares gradients (Adam's
    normalised first step would magnify rounding in near-zero gradients)."""
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    setup = build(cfg)
    before = {k: np.asarray(v) for k, v in flatten(setup.trainable).items()}
    state, _, sched = init_state(setup, cfg)
    tx = optax.sgd(1.0)
    state = state.replace(opt_state=tx.init(state.trainable))
    model = CountingModel(setup.model)
    fn = make_train_step(model, tx, sched, cfg.train.grad_accum, False, 0, jax.tree.map(lambda x: x.sharding, state))
    batches, losses = file_batches(cfg, setup.tokenizer), []
    for _ in range(steps):
        state, m = fn(state, setup.frozen, place_batch(next(batches), setup.mesh, rules=setup.rules))
        losses.append(float(m["loss"]))
    assert model.traces == 1, (mesh, model.traces)  # compiled once for all steps
    return before, {k: np.asarray(v) for k, v in flatten(state.trainable).items()}, losses, state


def _assert_same_update(before, ref, got, where):
    """Updates agree to 1e-5 of their size, plus 2 float32 ulps of the params they are read from."""
    for k in ref:
        upd_ref, upd = ref[k] - before[k], got[k] - before[k]
        tol = 1e-5 * (np.abs(upd_ref).max() + 1e-12) + 2 * np.finfo(np.float32).eps * np.abs(before[k]).max()
        err = np.abs(upd - upd_ref).max()
        assert err <= tol, (where, k, err, tol)


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_every_mesh_trains_like_one_device(tiny_config, method):
    cfg = tiny_config
    cfg.optim.clip_norm = 0.0
    cfg.lora.enabled = method != "full"
    cfg.lora.targets = ("all_linear",)
    cfg.model.quantize = "nf4" if method == "qlora" else "none"
    before, ref, ref_losses, _ = _train(cfg, (1, 1, 1))
    for mesh in MESHES:
        b, got, losses, state = _train(cfg, mesh)
        if method == "full" and mesh[1] * mesh[2] > 1:  # parameters really are spread over the mesh
            emb = state.trainable["embed_tokens"]["embedding"]
            assert len(emb.sharding.device_set) == 8 and emb.addressable_shards[0].data.size < emb.size
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(mesh))
        _assert_same_update(before, ref, got, mesh)


def test_micro_batches_on_a_mesh_equal_one_batch(tiny_config):
    cfg = tiny_config
    cfg.optim.clip_norm = 0.0
    cfg.lora.enabled = False
    before, ref, ref_losses, _ = _train(cfg, (2, 2, 2), steps=1)
    cfg.train.grad_accum = 2
    _, got, losses, _ = _train(cfg, (2, 2, 2), steps=1)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    _assert_same_update(before, ref, got, "grad_accum=2")


def test_rules_from_config_move_parameters(tiny_config):
    cfg = tiny_config
    cfg.lora.enabled = False
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 2, 4
    default = build(cfg)
    spec = lambda s, *p: s.trainable[p[0]][p[1]].sharding.spec  # noqa: E731
    assert spec(default, "embed_tokens", "embedding") == jax.sharding.PartitionSpec("tensor", "fsdp")
    apply_override(cfg, "--config.mesh.rules.embed=()")  # embeddings unsharded along embed
    apply_override(cfg, "--config.mesh.rules.mlp=fsdp,tensor")  # the MLP split both ways
    validate(cfg)
    moved = build(cfg)
    assert spec(moved, "embed_tokens", "embedding") == jax.sharding.PartitionSpec("tensor", None)
    mlp = moved.trainable["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec
    assert mlp == jax.sharding.PartitionSpec(None, None, ("fsdp", "tensor")), mlp


def test_unknown_axes_in_rules_are_named(tiny_config):
    cfg = tiny_config
    with pytest.raises(UserError, match="unknown config key 'mesh.rules.embd'.*did you mean 'embed'"):
        apply_override(cfg, "--config.mesh.rules.embd=()")
    apply_override(cfg, "--config.mesh.rules.mlp=('tensr',)")
    with pytest.raises(UserError, match="mesh.rules.mlp: unknown mesh axis 'tensr'"):
        validate(cfg)


def _losses(workdir):
    ev = EventAccumulator(os.path.join(workdir, "tb"))
    ev.Reload()
    return {e.step: e.value for e in ev.Scalars("train/loss")}


def test_checkpoint_from_one_mesh_resumes_on_others(tiny_config, tmp_path):
    """Written on (2,2,2) at step 2, restored onto 1 device and onto (1,8,1): steps 3-4 give the
    losses of an uninterrupted (2,2,2) run."""
    cfg = tiny_config
    cfg.train.steps, cfg.checkpoint.every, cfg.data.max_eval_examples = 4, 2, 2
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    straight = str(tmp_path / "straight")
    run(cfg, straight)
    want = _losses(straight)
    for mesh in [(1, 1, 1), (1, 8, 1)]:
        # The straight run's workdir as it was at step 2: checkpoint 2 only, no events yet.
        wd = str(tmp_path / f"resumed-{'x'.join(map(str, mesh))}")
        shutil.copytree(straight, wd)
        shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
        shutil.rmtree(os.path.join(wd, "tb"))
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
        run(cfg, wd)
        got = _losses(wd)
        assert sorted(got) == [3, 4]  # resumed at step 2
        np.testing.assert_allclose([got[3], got[4]], [want[3], want[4]], rtol=1e-5, err_msg=str(mesh))
