"""PEFT adapter export/import: transformers + peft load our adapters with equal logits, and an
exported adapter read back with lora.init_from is identical."""

import json
import os

import jax
import numpy as np
import pytest

from sftjax.params import flatten

torch = pytest.importorskip("torch", reason="PEFT parity needs the test extra: pip install -e .[test]")
peft = pytest.importorskip("peft")

IDS = np.random.default_rng(1).integers(0, 5000, (2, 10)).astype(np.int32)


def _randomised(setup, seed=0):
    """Non-zero adapters (B = 0 would make any loader look right)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                        setup.trainable)


def _peft_logits(model_dir, adapter_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()


CASES = {
    "lora_overrides_rslora": dict(targets=("all_linear",), rank_overrides=((r"mlp/", 4), (r"o_proj$", 2)), rslora=True),
    "dora": dict(targets=("attention",), dora=True),
    "unrolled_one_layer": dict(targets=(r"layers_1/self_attn/q_proj$",), scan=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_loads_our_adapter_with_equal_logits(tiny_config, tmp_path, case):
    from sftjax.build import build
    from sftjax.peft.export import write_adapter

    opts = dict(CASES[case])
    cfg = tiny_config
    cfg.model.scan_layers = opts.pop("scan", True)
    for k, v in opts.items():
        cfg.lora[k] = v
    setup = build(cfg)
    trained = _randomised(setup)
    out = str(tmp_path / "adapter")
    write_adapter(out, cfg.lora, trained, setup.model_cfg.num_hidden_layers, cfg.model.path)
    pc = json.load(open(os.path.join(out, "adapter_config.json")))
    assert pc["peft_type"] == "LORA" and pc["task_type"] == "CAUSAL_LM" and pc["use_dora"] == cfg.lora.dora
    ours = np.asarray(setup.model.apply(setup.full_params(trained), IDS))
    base = np.asarray(setup.model.apply(setup.frozen, IDS))
    assert np.abs(ours - base).max() > 1e-3
    theirs = _peft_logits(cfg.model.path, out)
    err = float(np.abs(ours - theirs).max())
    print(f"peft parity {case}: max |logit diff| = {err:.3g}")
    assert err <= 1e-3

    # Round trip: lora.init_from reads the folder back into identical adapters.
    cfg.lora.init_from = out
    again = build(cfg)
    a, b = flatten(again.trainable), flatten(trained)
    assert sorted(a) == sorted(b)
    for k in b:
        np.testing.assert_array_equal(np.asarray(a[k]), b[k], err_msg=k)


def test_init_from_mismatch_names_the_key(tiny_config, tmp_path):
    from sftjax.build import build
    from sftjax.errors import UserError
    from sftjax.peft.export import write_adapter

    cfg = tiny_config
    setup = build(cfg)
    out = str(tmp_path / "adapter")
    write_adapter(out, cfg.lora, setup.trainable, 2, cfg.model.path)
    cfg.lora.init_from = out
    cfg.lora.rank = 4
    with pytest.raises(UserError, match=r"lora.init_from: .* has shape .*lora.rank"):
        build(cfg)
    cfg.lora.rank, cfg.lora.alpha = 8, 32.0
    with pytest.raises(UserError, match="lora.init_from: .*lora_alpha=16.0 but lora.alpha=32.0"):
        build(cfg)
    cfg.lora.alpha, cfg.lora.targets = 16.0, ("attention",)
    with pytest.raises(UserError, match="lora.init_from: .*lacks .*k_proj"):
        build(cfg)


def test_cli_export_peft_and_bf16_merged(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    from sftjax.cli import _load_workdir, main
    from sftjax.train.loop import run

    wd = str(tmp_path / "run")
    tiny_config.lora.dora = True
    run(tiny_config, wd)
    _, setup, _, trainable = _load_workdir(wd)
    ours = np.asarray(setup.model.apply(setup.full_params(trainable), IDS))

    pdir = str(tmp_path / "peft")
    assert main(["export", f"--workdir={wd}", f"--out={pdir}", "--format=peft"]) == 0
    assert sorted(os.listdir(pdir)) == ["adapter_config.json", "adapter_model.safetensors"]
    err = float(np.abs(_peft_logits(tiny_config.model.path, pdir) - ours).max())
    print(f"peft parity after training (DoRA, CLI): max |logit diff| = {err:.3g}")
    assert err <= 1e-3
    bdir = str(tmp_path / "peft-bf16")
    assert main(["export", f"--workdir={wd}", f"--out={bdir}", "--format=peft", "--dtype=bfloat16"]) == 0
    from safetensors.numpy import load_file

    assert all(str(v.dtype) == "bfloat16" for v in load_file(os.path.join(bdir, "adapter_model.safetensors")).values())
    err16 = float(np.abs(_peft_logits(tiny_config.model.path, bdir) - ours).max())
    print(f"peft parity, bf16 adapter: max |logit diff| = {err16:.3g}")
    assert err16 <= 5e-2

    mdir = str(tmp_path / "merged-bf16")
    assert main(["export", f"--workdir={wd}", f"--out={mdir}", "--dtype=bfloat16"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(os.listdir(mdir))
    assert json.load(open(os.path.join(mdir, "config.json")))["torch_dtype"] == "bfloat16"
    ref = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    # Our merged weights rounded to bf16, run in float32: what the exported file should hold.
    import ml_dtypes

    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                           setup.merged_params(trainable))
    exact = np.asarray(setup.model.apply(rounded, IDS))
    err_b = float(np.abs(exact - theirs).max())
    err_vs_f32 = float(np.abs(ours - theirs).max())
    print(f"bf16 merged export: max |logit diff| vs bf16-rounded ours = {err_b:.3g}, vs float32 ours = {err_vs_f32:.3g}")
    assert err_b <= 1e-4
    assert err_vs_f32 <= 5e-2


def test_init_from_an_adapter_that_peft_saved(tiny_config, tmp_path):
    """An adapter written by PEFT itself (not by us) loads with lora.init_from and gives PEFT's logits."""
    from transformers import AutoModelForCausalLM

    from sftjax.build import build

    cfg = tiny_config
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    pc = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True,
                         rank_pattern={"v_proj": 4}, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, pc)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    out = str(tmp_path / "peft-saved")
    model.save_pretrained(out)

    cfg.lora.dora, cfg.lora.rank_overrides, cfg.lora.init_from = True, ((r"v_proj$", 4),), out
    setup = build(cfg)
    ours = np.asarray(setup.model.apply(setup.full_params(), IDS))
    err = float(np.abs(ours - theirs).max())
    print(f"PEFT-saved DoRA adapter loaded by lora.init_from: max |logit diff| = {err:.3g}")
    assert err <= 1e-3
