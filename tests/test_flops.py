"""Model FLOPs on a hand-computed tiny config, causal pair counts, and the peak table."""

import numpy as np
import pytest

from sftjax.models.llama import LlamaConfig
from sftjax.parallel import flops

# d=4, 2 heads of 2 (q: 4 wide), 1 KV head (k, v: 2 wide), MLP 6, 2 layers, vocabulary 10.
CFG = LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=2)
LAYER = {"self_attn/q_proj/kernel": (4, 4), "self_attn/k_proj/kernel": (4, 2), "self_attn/v_proj/kernel": (4, 2),
         "self_attn/o_proj/kernel": (4, 4), "mlp/gate_proj/kernel": (4, 6), "mlp/up_proj/kernel": (4, 6),
         "mlp/down_proj/kernel": (6, 4), "input_layernorm/scale": (4,), "post_attention_layernorm/scale": (4,)}
# Per layer 16 + 8 + 8 + 16 + 24 + 24 + 24 = 120 weight entries; 240 in the decoder; head 4 x 10 = 40.
TOP = {"embed_tokens/embedding": (10, 4), "norm/scale": (4,), "lm_head/kernel": (4, 10)}
STACKED = {**{f"layers/{k}": (2, *v) for k, v in LAYER.items()}, **TOP}
UNROLLED = {**{f"layers_{i}/{k}": v for i in range(2) for k, v in LAYER.items()}, **TOP}
ATTN = 4 * 2 * 2  # 4 * heads * head_dim FLOPs per (query, key) pair and layer, forward


def test_full_training_is_6n_plus_attention_plus_head():
    cost = flops.training_cost(CFG, STACKED, set(STACKED))
    assert cost.per_token == 6 * 240
    assert cost.per_target == 6 * 40
    assert cost.per_pair == 3 * ATTN * 2  # forward + both operand gradients, 2 layers
    # One full row of 3 tokens, all targets: 3 tokens, 6 causal pairs, 3 targets.
    assert cost.flops(3, 6, 3) == 1440 * 3 + 96 * 6 + 240 * 3 == 5616
    assert cost.per_row_token(3) == 5616 / 3


def test_lora_counts_frozen_weights_4x_and_adapters_6x():
    adapters = {"layers/self_attn/q_proj/lora_a": (2, 4, 1), "layers/self_attn/q_proj/lora_b": (2, 1, 4),
                "layers/self_attn/v_proj/lora_a": (2, 4, 1), "layers/self_attn/v_proj/lora_b": (2, 1, 2)}
    cost = flops.training_cost(CFG, {**STACKED, **adapters}, set(adapters))
    # Frozen 4 x 240; adapters (4 + 4 + 4 + 2) per layer x 2 layers x 6.
    assert cost.per_token == 4 * 240 + 6 * 28
    assert cost.per_target == 4 * 40  # frozen head: forward + input gradient
    assert cost.per_pair == 3 * ATTN * 2


def test_quantised_kernels_count_their_logical_entries():
    q = {k.replace("/kernel", "/kernel_nf4"): (*v[:-1], v[-1] // 2) for k, v in STACKED.items()
         if k.startswith("layers/") and k.endswith("/kernel")}
    rest = {k: v for k, v in STACKED.items() if not (k.startswith("layers/") and k.endswith("/kernel"))}
    adapters = {"layers/self_attn/q_proj/lora_a": (2, 4, 1), "layers/self_attn/q_proj/lora_b": (2, 1, 4)}
    cost = flops.training_cost(CFG, {**rest, **q, **adapters}, set(adapters))
    assert cost.per_token == 4 * 240 + 6 * 16


def test_nothing_below_the_trained_part_needs_a_backward_pass():
    head = flops.training_cost(CFG, STACKED, {"norm/scale", "lm_head/kernel"})
    assert head.per_token == 2 * 240  # decoder: forward only
    assert head.per_pair == ATTN * 2
    assert head.per_target == 6 * 40  # trained, and its input gradient reaches the trained norm
    last = flops.training_cost(CFG, UNROLLED, {p for p in UNROLLED if p.startswith("layers_1/")} | {"lm_head/kernel"})
    assert last.per_token == 2 * 120 + 6 * 120  # layer 0 forward only, layer 1 fully trained
    assert last.per_pair == ATTN * 1 + 3 * ATTN * 1


def test_fgm_doubles_the_work_and_needs_the_embedding_gradient():
    head = flops.training_cost(CFG, STACKED, {"lm_head/kernel"}, passes=2, embeddings_grad=True)
    assert head.per_token == 2 * 4 * 240 and head.per_pair == 2 * 3 * ATTN * 2


def test_prefix_keys_are_attended_by_every_token():
    prefix = {"layers/self_attn/prefix_k": (2, 5, 1, 2), "layers/self_attn/prefix_v": (2, 5, 1, 2)}
    cost = flops.training_cost(CFG, {**STACKED, **prefix}, set(prefix))
    assert cost.extra_keys == 5
    assert cost.flops(3, 6, 0) == cost.per_token * 3 + cost.per_pair * (6 + 5 * 3)


def test_attended_pairs_are_causal_per_example_or_segment():
    valid = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    assert flops.attended_pairs({"valid": valid}) == 6 + 1
    seg = np.array([[1, 1, 2, 0], [1, 1, 1, 1]])
    assert flops.attended_pairs({"valid": seg > 0, "segment_ids": seg}) == (3 + 1) + 10
    batch = {"valid": valid, "weights": np.array([[0, 1, 1, 0], [1, 0, 0, 0]], np.float32)}
    cost = flops.StepCost(per_token=10.0, per_pair=1.0, per_target=100.0)
    assert flops.batch_flops(cost, batch) == 10 * 4 + 7 + 100 * 3


@pytest.mark.parametrize("kind,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12), ("NVIDIA H100 80GB HBM3", "float32", 494.7e12),
    ("NVIDIA H200", "bfloat16", 989.4e12), ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-40GB", "float32", 156e12), ("TPU v4", "bfloat16", 275e12), ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12), ("TPU v5p", "float32", 459e12), ("TPU v6 lite", "bfloat16", 918e12),
    ("NVIDIA H100 PCIe", "bfloat16", None), ("TPU v4 lite", "bfloat16", None), ("cpu", "float32", None),
])
def test_peak_table(kind, dtype, expected):
    found = flops.table_peak(kind, dtype)
    assert (found[1] if found else None) == expected


def test_cpu_peak_is_measured_once_per_process():
    import jax

    first = flops.peak_for(jax.devices(), "float32")
    assert 1e8 < first.per_device < 1e13 and first.total == first.per_device  # one host for all 8 devices
    assert flops.measured_cpu_peak.cache_info().currsize >= 1
    assert flops.peak_for(jax.devices()[:1], "float32").per_device == first.per_device
