"""Will a run fit? Per-device memory of a training step on a mesh, from the config alone.

`sftjax plan` answers before anything is loaded or compiled, for any device count, and works for
a model described only by a config.json (no weights).

**Parameters, gradients, optimizer state** are counted, not modelled: `abstract_params` runs the
same split as training (`build.split`) on shape-only leaves, so LoRA/DoRA adapters, prompt and
prefix tuning, `train.freeze` and quantised frozen kernels (NF4 codes: half a byte per weight,
int8 codes, float32 absmax per 64 values) come out exactly; each leaf is laid out by its logical
axes and `mesh.rules` as training lays it out, and a device holds its shard. Gradients: one
float32 copy of the trainable shards (the scan builds the stacked layers' gradients in place).
Optimizer state: optax's own `init` (AdamW: 2x trainable float32; Lion: 1x; Adafactor: factored
second moments), each leaf that mirrors a parameter sharded like it (`train.step.opt_state_shardings`),
the rest (counts, factored moments) replicated.

**Updates**: after the backward pass the optimizer's updates (float32, trainable-sized) live
beside the gradients, when activations and weights in use are gone; the part is what that phase
needs beyond them, so the total is the larger of the two phases. Measured on SmolLM2 full
fine-tuning at 8x64 on data=8: 1.00 GiB of XLA temporaries, two trainable-sized float32 buffers.

**Weights in use**: the matmuls work on a copy of one decoder layer's weights, whole along the
mesh axes of the `embed` rule (fsdp gathers them, since activations are never split along embed),
and on the vocabulary head gathered likewise; a trained weight's gradient is also whole before it
is reduce-scattered, so trained weights count twice.

**Activations** are a model of what the backward pass keeps, read off `jax.ad_checkpoint`'s saved
residuals of the decoder layer and checked against XLA's compiled memory of the real step
(`compiled_memory`; docs/scaling.md has the figures). Per device: t = micro-batch / data-parallel
size x data.max_length tokens (the longest bucket, every position a head position); d hidden, H
and K query and key/value heads of size h, I MLP width, T length (+ P prefix/prompt keys), V
vocabulary, r LoRA rank, b bytes of model.dtype; H, K, I and V are divided by the mesh axes their
rules give them where those divide them (the model pins heads and MLP units so; otherwise they
stay whole). Each decoder layer the backward pass goes through (something trainable lies in it or
below it) keeps per token, by `model.remat`:

- none: the two RMSNorm inputs (2d float32), q, k, v ((H + 2K) h b), attention's log-normaliser
  (4 H: its backward recomputes the probabilities), five MLP-wide values (5 I b), each LoRA
  adapter's r b, and the input of each trained matmul: the normed input for q/k/v and for gate/up
  (d b each), the attention output for o (H h b), the MLP hidden for down (I b); d float32 per
  trained norm scale.
- dots_with_no_batch_dims_saveable: the weight matmuls' outputs ((H + 2K) h + 2d + 2I, and each
  adapter's r + output width), in b, and attention's log-normaliser (4 H).
- dots_saveable: the same, and where the attention output is needed again (o_proj trained or
  adapted) the scores and P V it is recomputed from (4 H T + H h b); otherwise attention's batched
  products live inside its own backward and are never residuals.
- full: the layer input (d b).
- offload: the layer input on the device; the dots_with_no_batch_dims_saveable set in host memory.

Outside the layers: the embeddings' output and the final norm's input and output (4d float32).
Plus the larger of two working sets: the head's (logits, their exponentials and their gradient,
one more copy when the head trains: (4 or 5) V float32 per token of one chunk of the chunked
loss, `train.loss.chunk_size`, plus the hidden-state gradient, d float32 per token; the attention
mask and its additive bias, T (1 + 4)) and one layer's backward (with remat, what `none` keeps
minus what the policy kept, recomputed; always attention's probabilities and their gradient,
8 H T). Measured limit: a bfloat16
step compiled for CPU keeps more temporaries than the same float32 step, so on CPU the comparison
holds for float32; the model halves b for bfloat16 (not checked against a GPU or TPU compile).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import jax
import numpy as np
import optax

from sftjax import params as P
from sftjax.config import MESH_AXES
from sftjax.errors import UserError
from sftjax.io.lazy import Lazy, normalise
from sftjax.models.layout import STACKED, UNROLLED
from sftjax.models.llama import LlamaConfig
from sftjax.parallel.flops import backward_rule
from sftjax.parallel.mesh import mesh_sizes
from sftjax.train.loss import chunk_size

GiB = 1024**3
PARTS = ("frozen", "trainable", "gradients", "updates", "optimizer", "weights_in_use", "activations", "batch")


class _Shape(Lazy):
    """A weight known by its shape alone. Reads give zeros: the only read a split makes is
    prompt tuning's starting embedding rows, whose values do not matter here."""

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def read_many(self, indices):
        return [np.zeros([s.stop - s.start for s in normalise(i, self.shape)], self.dtype) for i in indices]


def model_config(path: str) -> LlamaConfig:
    """The architecture of `model.path`, no weight read: a HF folder's config.json (the folder may
    hold nothing else), or a GGUF file's metadata."""
    from sftjax.io.load import resolve

    kind, file = resolve(path)
    if kind == "gguf":
        from sftjax.io.gguf_file import open_model

        return open_model(file)[0]
    from sftjax.io.hf import config_from_hf

    cfg_path = os.path.join(file, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"model.path: {file} has no config.json")
    with open(cfg_path) as f:
        return config_from_hf(json.load(f), cfg_path)


def base_shapes(mcfg: LlamaConfig) -> dict:
    """The base model's parameters as ShapeDtypeStructs (layers stacked), from its init unrun."""
    from sftjax.models.llama import Llama

    boxed = jax.eval_shape(lambda: Llama(mcfg).init(jax.random.key(0), np.zeros((1, 8), np.int32)))["params"]
    return jax.tree.map(lambda x: getattr(x, "value", x), boxed, is_leaf=lambda x: hasattr(x, "value"))


def abstract_params(cfg, mcfg: LlamaConfig) -> tuple[dict, dict]:
    """(trainable, frozen) trees of jax.ShapeDtypeStruct, split exactly as `build.split` splits
    real weights (it runs here on shape-only leaves); quantised leaves with their storage dtypes."""
    from sftjax.build import split
    from sftjax.models import layout

    base = jax.tree.map(lambda x: _Shape(x.shape), base_shapes(mcfg))
    if not cfg.model.scan_layers:
        base = layout.unstack(base, mcfg.num_hidden_layers)
    trainable, frozen = split(cfg, base, mcfg)
    struct = lambda x: jax.ShapeDtypeStruct(tuple(np.shape(x)), np.dtype(x.dtype))  # noqa: E731
    return jax.tree.map(struct, trainable), jax.tree.map(struct, frozen)


def factorisations(n: int) -> list[dict[str, int]]:
    """Every (data, fsdp, tensor) with data * fsdp * tensor = n."""
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return [dict(zip(MESH_AXES, (a, b, n // (a * b)), strict=True))
            for a, b in itertools.product(divisors, divisors) if n % (a * b) == 0]


def _split_size(rules, sizes, name: str | None) -> int:
    return math.prod(sizes[a] for a in rules.get(name, ())) if name else 1


def shard_shapes(tree: dict, axes: dict, sizes: dict, rules: dict, problems: list[str]) -> dict:
    """{path: per-device shape}; a dimension its mesh axes do not divide is listed in `problems`
    (with the message training would raise) and counted whole."""
    from sftjax.parallel.mesh import spec_for

    mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
    flat_axes, out = P.flatten(axes), {}
    for path, x in P.flatten(tree).items():
        shape = tuple(x.shape)
        try:
            spec = spec_for(path, shape, flat_axes[path], mesh, rules)
        except UserError as e:
            problems.append(str(e))
            out[path] = shape
            continue
        out[path] = tuple(d // math.prod(sizes[a] for a in ((s,) if isinstance(s, str) else s or ()))
                          for d, s in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True))
    return out


def _nbytes(shapes: dict, dtypes: dict) -> int:
    return sum(math.prod(s) * np.dtype(dtypes[p]).itemsize for p, s in shapes.items())


@dataclass
class Estimate:
    """Per-device bytes of one training step on one mesh, by part, and what stops it from running."""

    mesh: dict[str, int]
    frozen: int = 0
    trainable: int = 0
    gradients: int = 0
    updates: int = 0  # the optimizer's updates beyond the backward pass's activations and weights in use
    optimizer: int = 0
    weights_in_use: int = 0  # one layer's (and the head's) weights as the matmuls use them
    activations: int = 0
    batch: int = 0
    host_offload: int = 0  # model.remat=offload: activations kept in host memory instead
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(getattr(self, k) for k in PARTS)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _layer_modules(trainable: dict, n_layers: int) -> list[dict[str, int]]:
    """Per layer: {module inside the layer (`self_attn/q_proj`, `input_layernorm`): LoRA rank, or 0}
    for every module holding a trainable leaf there (a stacked leaf counts for every layer)."""
    out: list[dict[str, int]] = [{} for _ in range(n_layers)]
    for p, x in trainable.items():
        m = UNROLLED.match(p)
        at = range(n_layers) if p.startswith(STACKED) else [int(m.group(1))] if m else []
        mod, _, leaf = (p[len(STACKED):] if p.startswith(STACKED) else m.group(2) if m else p).rpartition("/")
        for i in at:
            out[i][mod] = max(out[i].get(mod, 0), x.shape[-1] if leaf == "lora_a" else 0)
    return out


def weights_in_use(local: dict, dtypes: dict, axes: dict, trained: set, sizes: dict, rules: dict,
                   n_layers: int) -> int:
    """Bytes of the weights the matmuls work on beyond the stored shards: a working copy of one
    decoder layer's matmul weights, whole along the mesh axes of the `embed` rule (fsdp gathers
    them: activations are never split along embed), and the vocabulary head gathered likewise;
    each twice if it trains (its gradient is whole before it is reduce-scattered)."""
    gather = _split_size(rules, sizes, "embed")
    layers: dict[int, float] = {}
    head = 0.0
    for path, shape in local.items():
        leaf = path.rpartition("/")[2]
        if leaf not in ("kernel", "kernel_nf4", "kernel_int8", "lora_a", "lora_b", "embedding"):
            continue
        stored = math.prod(shape) * np.dtype(dtypes[path]).itemsize
        whole = stored * (gather if "embed" in axes[path] else 1) * (1 + (path in trained))
        m = UNROLLED.match(path)
        if path.startswith(STACKED):
            for i in range(n_layers):
                layers[i] = layers.get(i, 0.0) + whole / n_layers
        elif m:
            layers[int(m.group(1))] = layers.get(int(m.group(1)), 0.0) + whole
        elif path == "lm_head/kernel" or (leaf == "embedding" and "lm_head/kernel" not in local):
            head += whole - stored * (1 + (path in trained)) if gather > 1 else 0.0
    return int(max(layers.values(), default=0.0) + head)


def activation_bytes(cfg, mcfg: LlamaConfig, trainable: dict, sizes: dict, rules: dict) -> tuple[int, int, list[str]]:
    """(device bytes, host bytes, notes) of the activations one micro-batch keeps (module docstring)."""
    notes = []
    n_layers, d, inner, vocab = mcfg.num_hidden_layers, mcfg.hidden_size, mcfg.intermediate_size, mcfg.vocab_size
    n_h, n_kv, h = mcfg.num_attention_heads, mcfg.num_key_value_heads, mcfg.dim_per_head
    micro = cfg.train.batch_size // cfg.train.grad_accum
    tokens = micro / _split_size(rules, sizes, "batch") * cfg.data.max_length
    b = 2 if cfg.model.dtype == "bfloat16" else 4

    def share(count: int, name: str) -> float:
        k = _split_size(rules, sizes, name)
        if k > 1 and count % k:
            notes.append(f"activations: {name} ({count}) does not split over mesh axes {rules[name]} of size {k}; "
                         "kept whole on each device")
            return 1.0
        return 1.0 / k

    heads, q_w, kv_w, mlp = n_h * share(n_h, "heads"), n_h * h * share(n_h, "heads"), n_kv * h * share(n_kv, "kv"), \
        inner * share(inner, "mlp")
    flat = P.flatten(trainable)
    prefix = [x.shape[-3] for p, x in flat.items() if p.endswith("/prefix_k")] + \
             [x.shape[0] for p, x in flat.items() if p == "prompt_embedding"]
    keys = cfg.data.max_length + max(prefix, default=0)  # prefix/prompt tuning: P more keys
    width = {"q_proj": q_w, "k_proj": kv_w, "v_proj": kv_w, "o_proj": d, "gate_proj": mlp, "up_proj": mlp,
             "down_proj": d}

    def none_set(mods: dict[str, int]) -> float:
        """Bytes per token one layer keeps without remat."""
        names = {m.rpartition("/")[2] for m in mods}
        x = 2 * d * 4 + (q_w + 2 * kv_w) * b + heads * 4 + 5 * mlp * b + sum(mods.values()) * b
        x += d * b * bool(names & {"q_proj", "k_proj", "v_proj"}) + q_w * b * ("o_proj" in names)
        x += d * b * bool(names & {"gate_proj", "up_proj"}) + mlp * b * ("down_proj" in names)
        return x + d * 4 * len(names & {"input_layernorm", "post_attention_layernorm"})

    def dots_set(mods: dict[str, int]) -> float:
        adapters = sum(r + width[m.rpartition("/")[2]] for m, r in mods.items() if r)
        return (q_w + 2 * kv_w + 2 * d + 2 * mlp + adapters) * b

    def policy_set(mods: dict[str, int]) -> float:
        """Bytes per token a layer keeps on the device under a remat policy other than none."""
        if policy in ("full", "offload"):
            return d * b
        # attention's log-normaliser; under dots_saveable with o_proj trained, the scores and P V too
        again = policy == "dots_saveable" and any(m.endswith("o_proj") for m in mods)
        return dots_set(mods) + heads * 4 + (heads * keys * 4 + q_w * b) * again

    policy, modules = cfg.model.remat, _layer_modules(flat, n_layers)
    backward = backward_rule(flat, n_layers, cfg.train.fgm_epsilon > 0)
    layers = [i for i in range(n_layers) if backward(i)]
    kept = sum(none_set(modules[i]) if policy == "none" else policy_set(modules[i]) for i in layers)
    host = sum(dots_set(modules[i]) for i in layers) if policy == "offload" else 0.0
    head_trained = "lm_head/kernel" in flat or (mcfg.tie_word_embeddings and "embed_tokens/embedding" in flat)
    # The chunked loss (train/loss.py) holds one chunk's logits, exponentials, their gradient and
    # the scatter's copy (one more when the head trains), and the hidden-state gradient of every token.
    chunk = chunk_size(micro * cfg.data.max_length, vocab) / _split_size(rules, sizes, "batch")
    head = (4 + head_trained) * vocab * share(vocab, "vocab") * 4 * min(chunk, tokens) / tokens + d * 4 + keys * 5
    # The backward pass of one layer at a time recomputes what the policy did not keep and holds
    # its attention probabilities and their gradient (float32; the scores' gradient takes the
    # place of the latter).
    def redo(i: int) -> float:
        return 0.0 if policy == "none" else none_set(modules[i]) - policy_set(modules[i]) * (policy != "offload")

    recompute = max((redo(i) + heads * keys * 8 for i in layers), default=0.0)
    outside = 4 * d * 4  # the embeddings' output and the final norm's input and output
    return int(tokens * (kept + outside + max(head, recompute))), int(tokens * host), notes


def estimate(cfg, mcfg: LlamaConfig, sizes: dict[str, int], trees=None) -> Estimate:
    """The per-device memory of `cfg`'s training step on a (data, fsdp, tensor) = `sizes` mesh."""
    from sftjax.build import logical_axes, transforms
    from sftjax.models.llama import Llama
    from sftjax.parallel.mesh import rules_from
    from sftjax.peft.adapted import Adapted
    from sftjax.train.optim import make_optimizer

    rules = rules_from(cfg.mesh)
    trainable, frozen = trees or abstract_params(cfg, mcfg)
    axes = logical_axes(Adapted(Llama(mcfg), transforms(cfg)), [trainable, frozen])
    est = Estimate(dict(sizes))
    dtypes = {p: x.dtype for p, x in (P.flatten(trainable) | P.flatten(frozen)).items()}
    t_shapes = shard_shapes(trainable, axes, sizes, rules, est.problems)
    f_shapes = shard_shapes(frozen, axes, sizes, rules, est.problems)
    est.trainable, est.frozen = _nbytes(t_shapes, dtypes), _nbytes(f_shapes, dtypes)
    est.gradients = sum(math.prod(s) * 4 for s in t_shapes.values())
    # optax's own state for the whole tree; a leaf that mirrors a parameter is sharded like it
    # (`train.step.opt_state_shardings`), anything else (counts, factored moments) is replicated.
    tx, _ = make_optimizer(cfg.optim, trainable, cfg.train.steps)
    whole = lambda s: s.size * s.dtype.itemsize  # noqa: E731
    per_leaf = optax.tree_map_params(
        tx, lambda s, p, n: n * s.dtype.itemsize if s.shape == p.shape else whole(s), jax.eval_shape(tx.init, trainable),
        trainable, P.unflatten({p: math.prod(s) for p, s in t_shapes.items()}), transform_non_params=whole)
    est.optimizer = int(sum(jax.tree.leaves(per_leaf)))
    micro = cfg.train.batch_size // cfg.train.grad_accum
    dp = _split_size(rules, sizes, "batch")
    if micro % dp:
        est.problems.append(f"train.batch_size: micro-batch {micro} is not divisible by the data-parallel size {dp} "
                            f"(mesh axes {tuple(rules['batch'])})")
    per_row = 4 + 1 + 4 + 4 + 4 + (8 if cfg.data.packing else 0)  # ids, valid, labels, weights, source (+ packing)
    est.batch = int(cfg.train.batch_size / dp * cfg.data.max_length * per_row)
    est.weights_in_use = weights_in_use(t_shapes | f_shapes, dtypes, P.flatten(axes), set(t_shapes), sizes, rules,
                                        mcfg.num_hidden_layers)
    est.activations, est.host_offload, est.notes = activation_bytes(cfg, mcfg, trainable, sizes, rules)
    est.updates = max(0, est.gradients - est.weights_in_use - est.activations)
    return est


def parse_bytes(text: str) -> int:
    """'16GiB', '80GB', '512MiB', '1e9' -> bytes (GB/MB are decimal, GiB/MiB binary)."""
    m = re.fullmatch(r"\s*([\d.e+]+)\s*([kmgt]i?b?)?\s*", text.lower())
    if not m:
        raise UserError(f"--device-memory: {text!r} is not a size such as 16GiB or 80GB")
    unit = m.group(2) or ""
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[unit[:1]]
    if "i" in unit:
        scale = 1024 ** " kmgt".index(unit[0])
    return int(float(m.group(1)) * scale)


def abstract_batch(cfg, mesh, rules) -> dict:
    """The step's batch as ShapeDtypeStructs: train.batch_size rows of data.max_length, laid out as
    `place_batch` lays it out, the head at every position (no `head_positions`)."""
    from sftjax.parallel.mesh import batch_sharding

    s = batch_sharding(mesh, rules)
    shape = (cfg.train.batch_size, cfg.data.max_length)
    dtypes = {"input_ids": np.int32, "valid": np.bool_, "labels": np.int32, "weights": np.float32, "source": np.int32}
    if cfg.data.packing:
        dtypes |= {"segment_ids": np.int32, "position_ids": np.int32}
    return {k: jax.ShapeDtypeStruct(shape, t, sharding=s) for k, t in dtypes.items()}


def compiled_memory(cfg, mcfg: LlamaConfig, trees=None) -> dict[str, int]:
    """XLA's own per-device bytes for the real train step on this process's devices, compiled from
    shapes alone (no weights): lower + compile + `memory_analysis()`. `peak` = arguments + outputs
    - donated (aliased) outputs + temporaries."""
    from jax.sharding import NamedSharding, PartitionSpec

    from sftjax.build import logical_axes, runtime, transforms
    from sftjax.models.llama import Llama
    from sftjax.parallel import mesh as M
    from sftjax.peft.adapted import Adapted
    from sftjax.train.loop import train_step
    from sftjax.train.optim import make_optimizer
    from sftjax.train.step import TrainState, opt_state_shardings

    mesh, rules = M.make_mesh(cfg.mesh), M.rules_from(cfg.mesh)
    model = Adapted(Llama(mcfg, runtime(cfg.model, mesh, rules)), transforms(cfg))
    trainable, frozen = trees or abstract_params(cfg, mcfg)
    axes = logical_axes(model, [trainable, frozen])

    def placed(tree):
        sh = M.param_shardings(tree, axes, mesh, rules)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)

    trainable, frozen = placed(trainable), placed(frozen)
    tx, sched = make_optimizer(cfg.optim, trainable, cfg.train.steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(tx.init, trainable), opt_state_shardings(tx, trainable, mesh))
    state = TrainState(jax.ShapeDtypeStruct((), np.int32, sharding=replicated), trainable, opt_state)
    step = train_step(cfg, SimpleNamespace(model=model), tx, sched, state, num_sources=1)
    ma = step.lower(state, frozen, abstract_batch(cfg, mesh, rules)).compile().memory_analysis()
    out = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def device_memory() -> int | None:
    """The first device's memory limit where it reports one (GPUs, TPUs); None on CPUs."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def human(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def report(cfg, n_devices: int | None = None, device_memory: int | None = None, compile: bool = True) -> dict:
    """Everything `sftjax plan` prints: the configured mesh's estimate (beside XLA's compiled figures
    when this process has the devices), and every (data, fsdp, tensor) mesh of `n_devices` with
    its total, its problems and whether it fits in `device_memory` bytes per device."""
    mcfg = model_config(cfg.model.path)
    n = n_devices or jax.device_count()
    trees = abstract_params(cfg, mcfg)
    sizes = mesh_sizes(cfg.mesh, n)
    chosen = estimate(cfg, mcfg, sizes, trees)
    out = {"model": cfg.model.path, "devices": n, "device_memory": device_memory,
           "parameters": sum(x.size for x in jax.tree.leaves(base_shapes(mcfg))),
           "trainable": sum(x.size for x in jax.tree.leaves(trees[0])),
           "step": {"micro_batch": cfg.train.batch_size // cfg.train.grad_accum, "grad_accum": cfg.train.grad_accum,
                    "length": cfg.data.max_length, "dtype": cfg.model.dtype, "remat": cfg.model.remat,
                    "optimizer": cfg.optim.name},
           "mesh": chosen.to_dict(), "xla": None}
    used = math.prod(sizes.values())
    if compile and not chosen.problems and used <= jax.device_count():
        fixed = cfg.copy_and_resolve_references()
        with fixed.unlocked():
            for a, v in sizes.items():
                fixed.mesh[a] = v
        out["xla"] = compiled_memory(fixed, mcfg, trees)
        out["xla"]["platform"] = jax.devices()[0].platform
    meshes = []
    for s in factorisations(n):
        e = chosen if s == sizes else estimate(cfg, mcfg, s, trees)
        fits = not e.problems and (device_memory is None or e.total <= device_memory)
        meshes.append({**e.to_dict(), "fits": fits})
    out["meshes"] = sorted(meshes, key=lambda m: (bool(m["problems"]), m["total"]))
    return out


def format_report(r: dict) -> str:
    """`report` as readable plain-text tables."""
    m, s = r["mesh"], r["step"]
    sizes = " ".join(f"{a}={v}" for a, v in m["mesh"].items())
    lines = [f"model {r['model']}: {r['parameters']:,} parameters, {r['trainable']:,} trainable "
             f"({100 * r['trainable'] / r['parameters']:.3f}%)",
             f"step: micro-batch {s['micro_batch']} x {s['length']} tokens (x{s['grad_accum']} accumulated), "
             f"{s['dtype']}, remat {s['remat']}, {s['optimizer']}",
             "", f"per-device memory on mesh {sizes} ({r['devices']} devices):"]
    x = r["xla"]
    for k in PARTS:
        lines.append(f"  {k.replace('_', ' '):<16}{human(m[k]):>12}")
    lines.append(f"  {'total':<16}{human(m['total']):>12}")
    if m["host_offload"]:
        lines.append(f"  {'(host)':<16}{human(m['host_offload']):>12}  activations offloaded to host memory")
    if x is not None:
        held = m["frozen"] + m["trainable"] + m["optimizer"] + m["batch"]
        lines += ["", f"  estimate vs XLA's compiled step ({x['platform']}, memory_analysis):",
                  f"  {'':<31}{'estimate':>12}{'XLA':>12}",
                  f"  {'weights, optimizer, batch':<31}{human(held):>12}{human(x['argument']):>12}  (arguments)",
                  f"  {'grads, updates, acts, in use':<31}"
                  f"{human(m['total'] - held):>12}"
                  f"{human(x['temp']):>12}  (temporaries)",
                  f"  {'peak':<31}{human(m['total']):>12}{human(x['peak']):>12}  "
                  f"(estimate / XLA = {m['total'] / x['peak']:.2f})"]
    if m["problems"]:
        lines += ["", "problems (training would stop at the first):"] + [f"  - {p}" for p in m["problems"]]
    if m["notes"]:
        lines += ["", "notes:"] + [f"  - {n}" for n in m["notes"]]
    budget = r["device_memory"]
    title = f"meshes of {r['devices']} devices" + (f" (fits: total <= {human(budget)})" if budget else "")
    lines += ["", title + ":", f"  {'data':>5}{'fsdp':>6}{'tensor':>7}{'weights':>12}{'gradients':>12}"
                                f"{'updates':>12}{'optimizer':>12}{'in use':>12}{'activations':>13}{'total':>12}  fits"]
    for e in r["meshes"]:
        d = e["mesh"]
        fits = "problems: " + str(len(e["problems"])) if e["problems"] else ("yes" if e["fits"] else "no")
        lines.append(f"  {d['data']:>5}{d['fsdp']:>6}{d['tensor']:>7}{human(e['frozen'] + e['trainable']):>12}"
                     f"{human(e['gradients']):>12}{human(e['updates']):>12}{human(e['optimizer']):>12}"
                     f"{human(e['weights_in_use']):>12}"
                     f"{human(e['activations']):>13}{human(e['total']):>12}  {fits}")
    return "\n".join(lines)
