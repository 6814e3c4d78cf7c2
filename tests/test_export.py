"""Export: a trained LoRA run becomes a merged HF folder that transformers loads with equal logits."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export parity needs the test extra: pip install -e .[test]")


def test_export_merged_folder_loads_in_transformers(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftjax.cli import main
    from sftjax.train.loop import run

    wd, out = str(tmp_path / "run"), str(tmp_path / "hf")
    run(tiny_config, wd)
    assert main(["export", f"--workdir={wd}", f"--out={out}"]) == 0
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]

    from sftjax.cli import _load_workdir

    _, setup, _, trainable = _load_workdir(wd)
    ids = np.random.default_rng(1).integers(0, 5000, (2, 10)).astype(np.int32)
    ours = np.asarray(setup.model.apply(setup.full_params(trainable), ids))
    base = np.asarray(setup.model.apply(setup.frozen, ids))
    assert np.abs(ours - base).max() > 1e-4  # training changed the model, so the check below means something
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
    tok = AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == setup.tokenizer.apply_chat_template(msgs, tokenize=False)


def test_export_bf16_and_sharded(tiny_config, tmp_path):
    from sftjax.build import build
    from sftjax.io.hf import read_hf_folder, write_hf_folder

    cfg = tiny_config
    cfg.lora.enabled = False
    setup = build(cfg)
    params = jax.tree.map(np.asarray, setup.merged_params())
    out = str(tmp_path / "sharded")
    write_hf_folder(out, setup.model_cfg, params, dtype="bfloat16", max_shard_bytes=2_000_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    cfg2, sd = read_hf_folder(out)
    assert cfg2 == setup.model_cfg
    emb = np.asarray(params["embed_tokens"]["embedding"])
    np.testing.assert_allclose(sd["model.embed_tokens.weight"], emb, atol=1e-2, rtol=1e-2)


@pytest.mark.slow
def test_convert_gguf_to_hf_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "smol")
    r = subprocess.run([sys.executable, "-m", "sftjax.cli", "convert", "--gguf=smollm2-135m-instruct", f"--out={out}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_hidden_layers"] == 30 and cfg["tie_word_embeddings"] is True
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    from sftjax.io.load import load_pretrained
    from sftjax.models.llama import Llama

    mcfg, params, tok = load_pretrained(out)
    ids = np.asarray([tok("Hello, my name is")["input_ids"]], np.int32)
    ours = np.asarray(Llama(mcfg).apply({"params": params}, ids))
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-3
