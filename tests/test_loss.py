"""The chunked vocabulary-head loss (train/loss.py) equals the plain one: loss, per-token NLL and
hits, and gradients, for adapters (frozen head), full fine-tuning (trainable head), tied
embeddings (the head's gradient adds to the input embedding's) and several chunks with padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import first_batch

from sftjax.build import build
from sftjax.models.llama import Llama, LlamaConfig
from sftjax.params import merge
from sftjax.peft.adapted import Adapted
from sftjax.train import loss as loss_mod
from sftjax.train.step import token_stats


def _plain(model, trainable, frozen, batch):
    """Reference: all logits at once."""
    logits = model.apply(merge(frozen, trainable), batch["input_ids"], batch["valid"],
                         head_positions=batch.get("head_positions"))
    logz = jax.nn.logsumexp(logits, -1)
    picked = jnp.take_along_axis(logits, batch["labels"][..., None], -1)[..., 0]
    return ((logz - picked) * batch["weights"]).sum(), (jnp.argmax(logits, -1) == batch["labels"])


def _compare(model, trainable, frozen, batch, monkeypatch, chunk=16):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 2 * chunk * model.cfg.vocab_size)  # several chunks
    ref, ref_grad = jax.jit(jax.value_and_grad(lambda t: _plain(model, t, frozen, batch)[0]))(trainable)
    got, grad = jax.jit(jax.value_and_grad(lambda t: token_stats(model, t, frozen, batch)["loss_sum"]))(trainable)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    stats = jax.jit(lambda t: token_stats(model, t, frozen, batch))(trainable)
    hit = jax.jit(lambda t: _plain(model, t, frozen, batch)[1])(trainable) | (batch["weights"] == 0)
    assert float(stats["correct"]) == float((hit * batch["weights"]).sum())
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree.leaves(ref_grad), strict=True):
        scale = float(jnp.abs(r).max()) + 1e-12
        assert float(jnp.abs(g - r).max()) <= 1e-4 * scale, jax.tree_util.keystr(path)


def test_chunked_loss_equals_plain_lora(tiny_config, monkeypatch):
    setup = build(tiny_config)  # LoRA: the head is frozen, its gradient flows only to the layers
    batch = {k: jnp.asarray(v) for k, v in first_batch(setup, tiny_config).items()}
    assert "lm_head" not in setup.trainable
    _compare(setup.model, setup.trainable, setup.frozen, batch, monkeypatch, chunk=128)


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_full_fine_tuning(tied, monkeypatch):
    """Every leaf trains, the head too (tied: its gradient adds to the input embedding's); head
    positions select a few targets per row."""
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    params = Llama(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, (4, 12)).astype(np.int32)  # 36 targets: 3 chunks of 16, the last padded
    batch = {"input_ids": ids, "valid": np.ones((4, 12), bool), "labels": rng.integers(0, 97, (4, 9)).astype(np.int32),
             "weights": (rng.random((4, 9)) > 0.3).astype(np.float32),
             "head_positions": np.sort(rng.integers(0, 12, (4, 9)), -1).astype(np.int32)}
    _compare(Adapted(Llama(cfg)), params, {}, batch, monkeypatch)


def test_chunk_size_is_bounded():
    assert loss_mod.chunk_size(2048, 49152) == 256  # 256 x 49,152 float32 logits = 48 MiB
    assert loss_mod.chunk_size(10, 49152) == 16
    assert loss_mod.chunk_size(2048, 152064) == 64


def test_bf16_matmuls_widen_on_cpus_without_bf16(monkeypatch):
    """On a CPU without bf16 instructions a bf16 matmul runs as float32 on the same (exactly
    widened) inputs: the result equals bf16 inputs with float32 accumulation."""
    from sftjax.models import layers

    x = jax.random.normal(jax.random.key(0), (16, 32)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (32, 8))
    ref = jnp.matmul(x, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    for native in (False, True):
        monkeypatch.setattr(layers, "_cpu_has_bf16", lambda native=native: native)
        assert layers.matmul_dtype(jnp.bfloat16) == (jnp.bfloat16 if native else jnp.float32)
        np.testing.assert_allclose(np.asarray(layers.dot(x, w, jnp.bfloat16), np.float32), np.asarray(ref, np.float32),
                                   rtol=1e-2)
    assert layers.matmul_dtype(jnp.float32) == jnp.float32
