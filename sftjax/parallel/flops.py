"""Model FLOPs of a training step, the devices' peak FLOP/s, and their ratio: MFU.

Model FLOPs count the matrix multiplications that the requested computation needs, whatever the
implementation does (the convention of PaLM, appendix B, and MaxText), so MFU compares runs and
implementations on equal terms:

- **Weights.** A weight matrix with n entries costs 2n FLOPs per token in the forward pass (one
  multiply-add per entry), 2n for the gradient of its input, and 2n for its own gradient. A trained
  weight costs 6n (the usual 6N for full training). A frozen weight (LoRA's base, QLoRA's
  quantised base, prompt tuning's model) costs 4n when the backward pass has to go through it and
  2n when nothing below it trains (e.g. the decoder under `train.freeze=head`). "Below" is judged
  per layer: a layer that holds anything trainable counts the input gradient of all its weights.
  LoRA adapters are weights like any other: a rank-r adapter on an [in, out] kernel adds
  6r(in + out) per token. Dequantisation (QLoRA) is not a matmul and is not counted.
- **Attention.** The scores QK^T and the weighted sum AV cost 2 d_head FLOPs each per (query, key)
  pair and head: 4 H d_head per pair per layer forward, three times that when the backward pass
  goes through the layer (the gradients of both operands of both products), frozen or not.
  Causal: a token attends to itself and the earlier tokens of its own example, so a row of n real
  tokens has n(n + 1)/2 pairs (packed rows: per segment), about half of the T x T score matrix the
  implementation computes; MaxText also counts half, PaLM the whole matrix. Prefix and prompt
  tuning add P keys for every token.
- **Vocabulary head.** 2 d V per token forward, counted at the loss's target positions only: that
  is all the loss asks for. Running the head only there (`head_positions`) is an optimisation
  that MFU neither rewards nor charges; running it at every position (packed batches) is extra
  work MFU does not credit.
- **Not counted:** padding tokens, embedding lookups, norms, rotary embeddings, softmax, the loss,
  the optimizer update, dropout and NEFTune noise, DoRA's column norm of W + sBA (2 in r out per
  module and micro-batch). FGM runs the forward and backward pass twice: both count.

So a full row of T tokens, all of them targets, costs per token 6 N_layers + 6 d V (head)
+ 3 * 4 L H d_head (T + 1)/2 when everything trains.

Peak FLOP/s: dense (no sparsity) per chip from the vendors' data sheets, for the compute dtype
(`model.dtype`): bfloat16, or float32 at JAX's default matmul precision (TF32 tensor cores on
A100/H100/H200, one bfloat16 pass on TPUs). On CPUs the peak is measured: the best of three runs
of a jitted 2048 x 2048 matmul (float32, or bfloat16 inputs with float32 accumulation as the model
computes), once per process and dtype; the simulated devices of one host share its cores, so the
host's figure is the peak of all of them.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sftjax.models.layout import STACKED, UNROLLED

# (device_kind regex, name, bfloat16 dense, float32 at the default precision) in FLOP/s per chip.
# NVIDIA: H100 SXM5 / H200 (same Hopper compute) 989.4 bf16, 494.7 TF32; A100 (SXM and PCIe) 312 and
# 156 (Hopper and Ampere architecture white papers). Google Cloud TPU pages: v4 275, v5e 197, v5p 459,
# v6e 918 (bf16; float32 matmuls run as one bf16 pass by default). The H100 PCIe/NVL (lower clocks)
# are left out rather than guessed.
PEAKS: tuple[tuple[str, str, float, float], ...] = (
    (r"h100(?!.*(pcie|nvl))", "H100 SXM", 989.4e12, 494.7e12),
    (r"h200", "H200", 989.4e12, 494.7e12),
    (r"a100", "A100", 312e12, 156e12),
    (r"^tpu v4$", "TPU v4", 275e12, 275e12),
    (r"^tpu v5( lite|e)$", "TPU v5e", 197e12, 197e12),
    (r"^tpu v5p?$", "TPU v5p", 459e12, 459e12),
    (r"^tpu v6( lite|e)$", "TPU v6e", 918e12, 918e12),
)
MATMUL_N = 2048  # CPU peak: one n x n by n x n matmul


@dataclass(frozen=True)
class Peak:
    """Peak FLOP/s of the devices a run uses: per device, in total, and where the figure comes from."""

    per_device: float
    total: float
    source: str


def table_peak(device_kind: str, dtype: str) -> tuple[str, float] | None:
    """(chip name, FLOP/s) from `PEAKS` for a `jax.Device.device_kind`, or None if it is not listed."""
    kind = device_kind.strip().lower()
    for pattern, name, bf16, f32 in PEAKS:
        if re.search(pattern, kind):
            return name, bf16 if dtype == "bfloat16" else f32
    return None


@functools.cache
def measured_cpu_peak(dtype: str) -> float:
    """FLOP/s of a jitted 2048 x 2048 matmul on this host (best of 3-12 runs, 1-2 s): float32, or
    bfloat16 inputs accumulated in float32 (`models.layers.dot`). Cached per process and dtype.
    Best of three alone once read 73 GFLOP/s right after a training step where 114-117 was
    typical, so it keeps timing while runs are cheap."""
    import jax
    import jax.numpy as jnp

    in_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((MATMUL_N, MATMUL_N), in_dtype), cpu)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()  # compile and warm up
    best, start, runs = math.inf, time.perf_counter(), 0
    while runs < 3 or (runs < 12 and time.perf_counter() - start < 1.0):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best, runs = min(best, time.perf_counter() - t), runs + 1
    return 2 * MATMUL_N**3 / best


def peak_for(devices: Sequence, dtype: str) -> Peak | None:
    """The peak of `devices` (a mesh's) for the compute dtype; None for an accelerator not in `PEAKS`."""
    first = devices[0]
    if first.platform == "cpu":
        hosts = len({d.process_index for d in devices})
        flops = measured_cpu_peak(dtype)
        return Peak(flops, flops * hosts, f"measured {MATMUL_N}x{MATMUL_N} matmul, {dtype}, {hosts} host(s)")
    found = table_peak(first.device_kind, dtype)
    if found is None:
        return None
    name, flops = found
    return Peak(flops, flops * len(devices), f"{name} {dtype} data sheet x {len(devices)}")


@dataclass(frozen=True)
class StepCost:
    """Training FLOPs by what they scale with: real tokens, attended (query, key) pairs, targets."""

    per_token: float  # decoder weights and adapters, forward + backward
    per_pair: float  # attention scores and values, summed over layers
    per_target: float  # the vocabulary head
    extra_keys: int = 0  # prefix / prompt tuning: keys every token also attends to

    def flops(self, tokens: float, pairs: float, targets: float) -> float:
        return self.per_token * tokens + self.per_pair * (pairs + self.extra_keys * tokens) + self.per_target * targets

    def per_row_token(self, length: int) -> float:
        """FLOPs per token of a full row of `length` tokens, every one a target (for tables and docs)."""
        return self.flops(length, length * (length + 1) / 2, length) / length


def _position(path: str, num_layers: int) -> int | None:
    """Depth of a leaf: -1 input embeddings, 0..L-1 a layer (0 for a stacked leaf: it spans all of
    them), L the final norm, L+1 the head; None for a leaf off that path."""
    if path.startswith(STACKED):
        return 0
    m = UNROLLED.match(path)
    if m:
        return int(m.group(1))
    if path.startswith(("embed_tokens/", "embeddings/")) or path == "prompt_embedding":
        return -1
    if path.startswith("norm/"):
        return num_layers
    if path.startswith(("lm_head/", "score/", "classifier/")):  # the vocabulary head or a task head
        return num_layers + 1
    return None


def backward_rule(trainable, num_layers: int, embeddings_grad: bool = False):
    """depth -> whether the backward pass goes through it: something trainable lies below that
    depth, or in the same decoder layer (depths as `_position`: -1 embeddings .. L+1 head)."""
    depths = [d for d in (_position(p, num_layers) for p in trainable) if d is not None]
    lowest = min(depths + ([-1] if embeddings_grad else []), default=num_layers + 2)
    return lambda pos: lowest < pos or (lowest == pos and 0 <= pos < num_layers)


def _matmul_entries(path: str, shape: tuple[int, ...]) -> int:
    """Weight entries a token multiplies through at this leaf (0 for non-matmul leaves)."""
    leaf = path.rpartition("/")[2]
    size = math.prod(shape)
    if leaf in ("kernel", "kernel_int8", "lora_a", "lora_b"):
        return size
    if leaf == "kernel_nf4":  # two 4-bit codes per byte
        return 2 * size
    return 0


def training_cost(mcfg, shapes: Mapping[str, tuple[int, ...]], trainable: set[str], passes: int = 1,
                  embeddings_grad: bool = False) -> StepCost:
    """The `StepCost` of one training pass over a param tree.

    Args:
      mcfg: the LlamaConfig (layers, heads, head size, vocabulary, tied head).
      shapes: {path: shape} of every leaf the model runs on (trainable and frozen, quantised or not).
      trainable: the paths that receive gradients.
      passes: forward/backward passes per micro-batch (FGM: 2).
      embeddings_grad: the gradient of the input embeddings is needed even if they are frozen (FGM).
    """
    n_layers = mcfg.num_hidden_layers
    backward_through = backward_rule(trainable, n_layers, embeddings_grad)
    layers_with_backward = sum(backward_through(i) for i in range(n_layers))
    per_token = per_target = 0.0
    extra_keys = 0
    for path, shape in shapes.items():
        leaf = path.rpartition("/")[2]
        if leaf in ("prefix_k", "prefix_v"):
            extra_keys = shape[-3]
        elif path == "prompt_embedding":
            extra_keys = shape[0]
        n = _matmul_entries(path, shape)
        trained = path in trainable
        if path == "embed_tokens/embedding" and mcfg.tie_word_embeddings and not getattr(mcfg, "num_labels", 0):
            per_target += math.prod(shape) * (2 + 2 * backward_through(n_layers + 1) + 2 * trained)
        if not n:
            continue
        pos = _position(path, n_layers)
        if path.startswith(STACKED):  # n / L entries in each layer
            per_token += n / n_layers * (2 * n_layers + 2 * layers_with_backward + 2 * n_layers * trained)
        elif pos == n_layers + 1:
            per_target += n * (2 + 2 * backward_through(pos) + 2 * trained)
        else:
            per_token += n * (2 + 2 * backward_through(pos) + 2 * trained)
    attn = 4 * mcfg.num_attention_heads * mcfg.dim_per_head
    per_pair = attn * (n_layers + 2 * layers_with_backward)
    return StepCost(passes * per_token, passes * per_pair, passes * per_target, extra_keys)


def attended_pairs(batch: Mapping[str, np.ndarray]) -> int:
    """Causal (query, key) pairs of a host batch: n(n + 1)/2 per example of n real tokens (packed
    rows: per segment)."""
    if "segment_ids" in batch:
        seg = np.asarray(batch["segment_ids"])
        counts = np.concatenate([np.bincount(row)[1:] for row in seg]) if seg.size else np.zeros(0)
    else:
        counts = np.asarray(batch["valid"]).sum(-1)
    counts = counts.astype(np.int64)
    return int((counts * (counts + 1) // 2).sum())


def batch_flops(cost: StepCost, batch: Mapping[str, np.ndarray]) -> float:
    """Model FLOPs of one training step on a host batch (real tokens, causal pairs, targets)."""
    return cost.flops(float(np.asarray(batch["valid"]).sum()), attended_pairs(batch),
                      float(np.asarray(batch["weights"]).sum()))


def setup_cost(cfg, mcfg, trainable: Mapping, frozen: Mapping) -> StepCost:
    """The `StepCost` of a run: its trees (arrays or ShapeDtypeStructs) and its config's FGM setting."""
    from sftjax.params import flatten

    shapes = {p: tuple(np.shape(x)) for p, x in (flatten(frozen) | flatten(trainable)).items()}
    fgm = cfg.train.fgm_epsilon > 0
    return training_cost(mcfg, shapes, set(flatten(trainable)), passes=2 if fgm else 1, embeddings_grad=fgm)


def for_run(cfg, setup) -> tuple[StepCost, Peak] | None:
    """(cost, peak) for the MFU a training run logs; None (said once in the log) where the devices'
    peak is unknown."""
    import logging

    devices = list(setup.mesh.devices.flat)
    peak = peak_for(devices, cfg.model.dtype)
    if peak is None:
        logging.getLogger("sftjax").info("MFU not logged: no peak FLOP/s known for device kind %r (see "
                                         "sftjax/parallel/flops.py PEAKS)", devices[0].device_kind)
        return None
    return setup_cost(cfg, setup.model_cfg, setup.trainable, setup.frozen), peak
