"""The planner: exact parameter/optimizer bytes against a placed run, every divisibility problem,
config.json-only models, the CLI, and the estimate against XLA's compiled step on 8 devices."""

import json
import math
import os

import jax
import numpy as np
import pytest
from helpers import init_state

from sftjax.build import build, split
from sftjax.cli import main
from sftjax.config import base_config, validate
from sftjax.io.load import load_pretrained
from sftjax.parallel import plan
from sftjax.params import flatten

ROOT = os.path.dirname(os.path.dirname(__file__))
LLAMA_8B = os.path.join(ROOT, "configs", "models", "llama-3-8b")
LLAMA_70B = os.path.join(ROOT, "configs", "models", "llama-3-70b")


def _model_dir(tmp_path, **arch):
    """A folder holding only a config.json."""
    hf = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 384,
          "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **arch}
    os.makedirs(tmp_path, exist_ok=True)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf, f)
    return str(tmp_path)


def _cfg(path, mesh=(8, 1, 1), **kw):
    c = base_config()
    c.model.path = path
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    for key, v in kw.items():
        sect, name = key.split("__")
        c[sect][name] = v
    validate(c)
    return c


@pytest.mark.parametrize("kw", [dict(), dict(lora__dora=True, lora__targets=("all_linear",)),
                                dict(model__quantize="nf4"), dict(model__quantize="int8"),
                                dict(lora__enabled=False, prompt_tuning__method="prompt"),
                                dict(lora__enabled=False, prompt_tuning__method="prefix"),
                                dict(lora__enabled=False, train__freeze="head"),
                                dict(lora__enabled=False, model__scan_layers=False, train__freeze="last_layers",
                                     train__last_layers=1)])
def test_shape_only_split_equals_the_split_of_real_weights(tiny_config, kw):
    cfg = _cfg(tiny_config.model.path, **kw)
    mcfg, base, _ = load_pretrained(cfg.model.path)
    if not cfg.model.scan_layers:
        from sftjax.models.layout import unstack

        base = unstack(base, mcfg.num_hidden_layers)
    real = [{p: (tuple(np.shape(x)), np.dtype(x.dtype)) for p, x in flatten(t).items()} for t in split(cfg, base, mcfg)]
    shapes = [{p: (x.shape, x.dtype) for p, x in flatten(t).items()} for t in plan.abstract_params(cfg, mcfg)]
    assert shapes == real


def _device0_bytes(tree) -> int:
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


@pytest.mark.parametrize("kw", [dict(lora__enabled=False), dict(model__quantize="nf4"),
                                dict(lora__enabled=False, optim__name="adafactor")])
def test_parameter_and_optimizer_bytes_are_what_a_placed_run_holds(tiny_config, kw):
    cfg = _cfg(tiny_config.model.path, mesh=(2, 2, 2), **kw)
    setup = build(cfg)
    state = init_state(setup, cfg)[0]
    est = plan.estimate(cfg, setup.model_cfg, {"data": 2, "fsdp": 2, "tensor": 2})
    assert est.problems == []
    assert est.trainable == _device0_bytes(setup.trainable) and est.frozen == _device0_bytes(setup.frozen)
    assert est.optimizer == _device0_bytes(state.opt_state)  # moments sharded like their parameters
    assert est.gradients == sum(math.prod(s.data.shape) * 4 for x in jax.tree.leaves(setup.trainable)
                                for s in x.addressable_shards if s.device == jax.devices()[0])


def test_every_divisibility_problem_is_listed(tmp_path):
    path = _model_dir(tmp_path, vocab_size=1000, intermediate_size=200, num_attention_heads=3,
                      num_key_value_heads=1, head_dim=32, hidden_size=96)
    cfg = _cfg(path, mesh=(1, 1, -1), lora__enabled=False, train__batch_size=6)
    est = plan.estimate(cfg, plan.model_config(path), plan.mesh_sizes(cfg.mesh, 6))
    text = "\n".join(est.problems)
    # vocab 1000, MLP 200 and KV 32 do not split over tensor=6 (q: 96 does); 4 stacked MLP kernels,
    # k/v kernels and biases-free k/v, the embedding and the head: one line each.
    for leaf in ("embed_tokens/embedding", "lm_head/kernel", "layers/mlp/gate_proj/kernel", "layers/mlp/up_proj/kernel",
                 "layers/mlp/down_proj/kernel", "layers/self_attn/k_proj/kernel", "layers/self_attn/v_proj/kernel"):
        assert leaf in text, (leaf, text)
    assert "q_proj" not in text and len(est.problems) == 7
    cfg = _cfg(path, mesh=(4, 1, 1), train__batch_size=6)
    assert any("micro-batch 6 is not divisible by the data-parallel size 4" in p
               for p in plan.estimate(cfg, plan.model_config(path), plan.mesh_sizes(cfg.mesh, 4)).problems)


def test_config_json_only_models_and_fitting_meshes():
    cfg = _cfg(LLAMA_8B, mesh=(-1, 1, 1), lora__enabled=False, model__dtype="bfloat16", model__remat="full",
               train__batch_size=64, data__max_length=2048)
    r = plan.report(cfg, n_devices=64, device_memory=80 * 10**9, compile=False)
    assert r["parameters"] == 8_030_261_248 and r["trainable"] == r["parameters"]
    meshes = {(m["mesh"]["data"], m["mesh"]["fsdp"], m["mesh"]["tensor"]): m for m in r["meshes"]}
    assert len(meshes) == len(plan.factorisations(64)) == 28
    # Full fine-tuning keeps 16 bytes per parameter (weights, gradients, two AdamW moments): pure
    # data parallelism cannot fit 8B in 80 GB, sharding it 64 ways can.
    assert not meshes[(64, 1, 1)]["fits"] and meshes[(1, 64, 1)]["fits"]
    assert meshes[(1, 64, 1)]["optimizer"] == pytest.approx(2 * 4 * 8_030_261_248 / 64, rel=1e-3)
    assert meshes[(1, 64, 1)]["problems"] == []
    big = plan.report(_cfg(LLAMA_70B, model__quantize="nf4"), n_devices=8, compile=False)
    d, vocab, layers = 8192, 128256, 80
    plain = 2 * vocab * d + d + 2 * d * layers  # embedding, head and norm scales stay float32
    quantised = big["parameters"] - plain  # NF4: half a byte + a float32 absmax per 64 weights
    assert big["mesh"]["frozen"] == 4 * plain + quantised // 2 + quantised // 64 * 4


def test_cli_plan_json_and_text(capsys):
    cfg_file = os.path.join(ROOT, "configs", "quickstart.py")
    assert main(["plan", f"--config={cfg_file}", f"--config.model.path={LLAMA_8B}", "--devices=16",
                 "--device-memory=16GiB", "--json", "--no-compile"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["devices"] == 16 and r["device_memory"] == 16 * 1024**3 and r["xla"] is None
    assert any(m["fits"] for m in r["meshes"])
    assert main(["plan", f"--config={cfg_file}", f"--config.model.path={LLAMA_8B}", "--devices=16", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "per-device memory on mesh" in out and "activations" in out and "meshes of 16 devices" in out
    assert main(["plan", f"--config={cfg_file}", "--device-memory=lots"]) == 2
    assert "--device-memory" in capsys.readouterr().err


@pytest.mark.parametrize("model,mesh,kw", [
    ("tiny", (8, 1, 1), {}), ("tiny", (2, 2, 2), dict(lora__enabled=False)),
    ("tiny", (1, 2, 4), dict(model__remat="full")),
    # Llama-3-8B from its config.json alone: fsdp gathers each layer's and the head's weights.
    ("8b", (1, 8, 1), dict(train__batch_size=8, data__max_length=64)),
])
def test_estimate_within_25_percent_of_xla_on_8_devices(tmp_path, model, mesh, kw):
    path = _model_dir(tmp_path) if model == "tiny" else LLAMA_8B
    cfg = _cfg(path, mesh=mesh, **({"train__batch_size": 16, "data__max_length": 128} | kw))
    mcfg = plan.model_config(path)
    est = plan.estimate(cfg, mcfg, plan.mesh_sizes(cfg.mesh, 8))
    xla = plan.compiled_memory(cfg, mcfg)
    held = est.frozen + est.trainable + est.optimizer + est.batch
    assert held == pytest.approx(xla["argument"], rel=0.1)
    assert est.total == pytest.approx(xla["peak"], rel=0.25), (est.to_dict(), xla)


def test_training_refuses_a_config_json_only_folder():
    from sftjax.errors import UserError
    from sftjax.io.load import load_tokenizer

    with pytest.raises(UserError, match="no tokenizer.*sftjax plan"):
        load_tokenizer(LLAMA_8B)
