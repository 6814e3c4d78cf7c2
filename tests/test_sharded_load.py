"""Sharded loading: each process reads only the slices its devices hold, one tensor at a time.

- Lazy leaves read the same numbers as whole reads, for any slice; per-shard quantisation equals
  the global one.
- `build` on an 8-device (data 1, fsdp 4, tensor 2) mesh places exactly the arrays of a whole
  read followed by whole-kernel quantisation, for a HF folder and the embedded GGUF, with and
  without model.quantize=nf4, every device's shard checked.
- A 70B-shaped config goes through everything `build` does before reading (split, QLoRA + DoRA,
  shardings) without a single read, and every device's slice is its share.
- Two processes (jax.distributed, one CPU device each, fsdp=2) load a ~150 MB model: each one's
  peak resident memory grows by about half the model plus one tensor, where the old path (whole
  state dict, then stacked copies, then placement) grows by about 2.5 times that; the placed
  arrays equal a single-process load. See `test_two_processes_each_read_half`.

Run as a script, this file is one of those two processes.
"""

import hashlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_lazy_slices_equal_whole_reads(tmp_path):
    from safetensors.numpy import save_file

    from sftjax.io.lazy import Array, Stacked, materialise, safetensors_file
    from sftjax.peft import quant

    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((32, 48)).astype(np.float32) for _ in range(3)]  # HF [out, in]
    save_file({f"w{i}": w for i, w in enumerate(ws)}, str(tmp_path / "m.safetensors"))
    sd = safetensors_file(str(tmp_path / "m.safetensors"))
    lazy = Stacked([sd[f"w{i}"].T for i in range(3)])  # [3, 48, 32], as hf_to_lazy builds it
    whole = np.stack([w.T for w in ws])
    assert lazy.shape == whole.shape and _same(materialise(lazy), whole)
    idx = [(slice(1, 3), slice(8, 40), slice(0, 16)), (slice(0, 1), slice(None), slice(16, 32))]
    for got, i in zip(lazy.read_many(idx), idx, strict=True):
        assert _same(got, whole[i])
    assert _same(lazy[2].read((slice(4, 9), slice(None))), whole[2, 4:9])  # one layer (unrolled)

    # Quantised by whole rows, a shard equals the same slice of the whole kernel's quantisation,
    # also where a block of 64 spans two 32-wide rows.
    for out in (32, 192):
        k = rng.standard_normal((2, 64, out)).astype(np.float32)
        for kind in quant.KINDS:
            full = quant.quantize(k, kind)
            leaves = quant.quantize_tree({"layers": {"k_proj": {"kernel": Array(k)}}}, kind)["layers"]["k_proj"]
            codes, absmax = leaves[f"kernel_{kind}"], leaves["kernel_absmax"]
            assert codes.shape == full[f"kernel_{kind}"].shape and absmax.shape == full["kernel_absmax"].shape
            for lo, hi in ((0, 16), (16, 48), (48, 64)):
                i = (slice(0, 2), slice(lo, hi), slice(None))
                assert _same(codes.read(i), full[f"kernel_{kind}"][i])
                j = (slice(0, 2), slice(lo * out // 64, hi * out // 64))
                assert _same(absmax.read(j), full["kernel_absmax"][j])
    with pytest.raises(ValueError, match="cuts rows"):  # a block of 64 ends inside a row of 192
        absmax.read((slice(0, 2), slice(0, 1)))

    class Recorded(Array):  # a stacked kernel is quantised one layer at a time
        def read_many(self, indices):
            reads.extend(math.prod(s.stop - s.start for s in i) for i in indices)
            return super().read_many(indices)

    reads: list[int] = []
    leaves = quant.quantize_tree({"layers": {"k_proj": {"kernel": Recorded(k)}}}, "nf4")["layers"]["k_proj"]
    assert _same(leaves["kernel_nf4"].read(), quant.quantize(k, "nf4")["kernel_nf4"])
    assert max(reads) == k[0].size


@pytest.mark.slow  # parsing the embedded GGUF's metadata alone takes ~10 s on 2 cores
def test_gguf_slices_equal_whole_dequantisation():
    from gguf.quants import dequantize

    from sftjax.io.gguf_file import _unpermute, open_model
    from sftjax.io.load import embedded_model_path

    cfg, sd = open_model(embedded_model_path())
    tensors = {x.tensor.name: x.tensor for x in sd.values()}

    def whole(name):
        t = tensors[name]
        return dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))

    q = _unpermute(whole("blk.3.attn_q.weight"), cfg.num_attention_heads)  # Q4_1, un-permuted rows
    assert _same(sd["model.layers.3.self_attn.q_proj.weight"].read((slice(64, 200), slice(100, 300))), q[64:200, 100:300])
    norm = whole("blk.3.attn_norm.weight")  # F32: read by slices from the map
    assert _same(sd["model.layers.3.input_layernorm.weight"].read((slice(10, 20),)), norm[10:20])


def _reference_frozen(cfg, base: dict) -> dict:
    """The frozen tree the old path built: whole arrays, whole-kernel quantisation."""
    from sftjax.params import flatten
    from sftjax.peft import quant

    out = {}
    for path, v in flatten(base).items():
        if cfg.model.quantize != "none" and quant.LAYER_KERNEL.search(path):
            out |= {f"{path[:-len('/kernel')]}/{k}": q for k, q in quant.quantize(v, cfg.model.quantize).items()}
        else:
            out[path] = v
    return out


def _check_placed(placed: dict, ref: dict) -> None:
    """Every shard of every device equals the reference's slice, bit for bit."""
    from sftjax.params import flatten

    placed = flatten(placed)
    assert sorted(placed) == sorted(ref)
    for path, arr in placed.items():
        assert arr.shape == ref[path].shape, path
        for shard in arr.addressable_shards:
            assert _same(shard.data, np.asarray(ref[path])[shard.index]), (path, shard.device)


@pytest.mark.parametrize("quantize,scan", [("none", True), ("nf4", True), ("nf4", False)])
def test_placed_tree_equals_whole_load_hf(tiny_config, quantize, scan):
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    from sftjax.build import build
    from sftjax.io.hf import read_hf_folder
    from sftjax.io.load import load_pretrained
    from sftjax.models import layout
    from sftjax.params import flatten, unflatten
    from sftjax.peft import lora, quant

    cfg = tiny_config
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
    cfg.model.quantize, cfg.model.scan_layers = quantize, scan
    cfg.lora.targets, cfg.lora.dora = ("all_linear",), quantize != "none"
    # The whole read is the file's bytes.
    raw = load_file(os.path.join(cfg.model.path, "model.safetensors"))
    sd = read_hf_folder(cfg.model.path)[1]
    assert sorted(sd) == sorted(raw) and all(_same(sd[k], raw[k]) for k in raw)

    setup = build(cfg)
    mcfg, base, _ = load_pretrained(cfg.model.path, setup.tokenizer)
    base = base if scan else layout.unstack(base, mcfg.num_hidden_layers)
    _check_placed(setup.frozen, _reference_frozen(cfg, base))
    ref_adapters = flatten(lora.init_adapters(base, ["all_linear"], cfg.lora.rank, cfg.train.seed))
    train = flatten(setup.trainable)
    for path, v in ref_adapters.items():
        assert _same(train[path], v), path
    if cfg.lora.dora:  # the old path's column norms of the dequantised kernels, up to the sum order
        deq = flatten(quant.dequantize_tree(unflatten(_reference_frozen(cfg, base))))
        for path in (p for p in train if p.endswith("/lora_magnitude")):
            want = np.asarray(lora.column_norm(jnp.asarray(deq[path.replace("lora_magnitude", "kernel")])))
            np.testing.assert_allclose(np.asarray(train[path]), want, rtol=2e-6, err_msg=path)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_placed_tree_equals_whole_load_gguf(tiny_config, quantize):
    from sftjax.build import build
    from sftjax.io.load import load_pretrained

    cfg = tiny_config
    cfg.model.path = "smollm2-135m-instruct"
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
    cfg.mesh.rules.heads = ()  # SmolLM2's 9 heads do not split in 2 (an error); MLP, KV and vocab still do
    cfg.model.quantize = quantize
    setup = build(cfg)
    _, base, _ = load_pretrained(cfg.model.path, setup.tokenizer)
    _check_placed(setup.frozen, _reference_frozen(cfg, base))


def test_70b_config_needs_no_read_before_placement(tiny_config):
    """Everything `build` does before placing works on shapes alone, and each device's slice of
    every leaf is its share: no step needs a full copy on any host."""

    from sftjax.build import logical_axes, split, transforms
    from sftjax.io.hf import config_from_hf, hf_to_lazy
    from sftjax.io.lazy import Lazy
    from sftjax.models.llama import Llama
    from sftjax.parallel import mesh as sharding
    from sftjax.params import count, flatten
    from sftjax.peft.adapted import Adapted

    class Unread(Lazy):
        def __init__(self, shape):
            self.shape = tuple(shape)

        def read_many(self, indices):
            raise AssertionError(f"read {indices} of {self.shape} before placement")

    mcfg = config_from_hf({"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192,
                           "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                           "num_key_value_heads": 8})  # Llama-2-70B's config.json fields
    hd, kv = 128, 8 * 128
    shapes = {"model.embed_tokens.weight": (32000, 8192), "model.norm.weight": (8192,), "lm_head.weight": (32000, 8192)}
    for i in range(80):
        for name, shape in (("self_attn.q_proj", (8192, 8192)), ("self_attn.k_proj", (kv, 8192)),
                            ("self_attn.v_proj", (kv, 8192)), ("self_attn.o_proj", (8192, 64 * hd)),
                            ("mlp.gate_proj", (28672, 8192)), ("mlp.up_proj", (28672, 8192)),
                            ("mlp.down_proj", (8192, 28672))):
            shapes[f"model.layers.{i}.{name}.weight"] = shape
        for name in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"model.layers.{i}.{name}.weight"] = (8192,)
    base = hf_to_lazy({k: Unread(s) for k, s in shapes.items()}, mcfg, "config.json")
    cfg = tiny_config
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
    cfg.model.quantize = "nf4"
    cfg.lora.targets, cfg.lora.dora = ("all_linear",), True
    trainable, frozen = split(cfg, base, mcfg)
    model = Adapted(Llama(mcfg), transforms(cfg))
    axes = logical_axes(model, [trainable, frozen])
    mesh = sharding.make_mesh(cfg.mesh)
    total = per_device = 0
    for tree in (trainable, frozen):
        for path, s in flatten(sharding.param_shardings(tree, axes, mesh)).items():
            x = flatten(tree)[path]
            biggest = max(math.prod(len(range(*sl.indices(n))) for sl, n in zip(i, x.shape, strict=True))
                          for i in s.addressable_devices_indices_map(tuple(x.shape)).values())
            if x.size >= 2**20:  # every big leaf is split (quantised codes only over their input axis)
                assert biggest * 2 <= x.size, (path, x.shape, s.spec)
            total, per_device = total + x.size * x.dtype.itemsize, per_device + biggest * x.dtype.itemsize
    assert count(base) > 68e9  # the whole 70B model, nothing read
    # 8 devices; quantised codes split only over their input axis (4 or 2 ways, see peft/quant.py)
    assert per_device < 0.4 * total, (per_device, total)  # measured: 0.328


# --- two processes --------------------------------------------------------------------------

MB = 2**20


def _status() -> dict[str, int]:
    s = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", s).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _peak_growth(fn):
    """(fn(), growth of this process's peak resident memory while fn ran, in bytes). The peak is
    reset first (/proc/self/clear_refs), so the baseline is what is resident now."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status()["VmRSS"]
    out = fn()
    return out, _status()["VmHWM"] - before


def _digests(tree) -> dict[str, str]:
    from jax.experimental import multihost_utils

    from sftjax.params import flatten

    out = {}
    for path, v in flatten(tree).items():
        full = np.asarray(multihost_utils.process_allgather(v, tiled=True))
        out[path] = f"{full.dtype}{full.shape}:" + hashlib.sha256(full.tobytes()).hexdigest()
    return out


def _two_process_config(model_dir, fsdp):
    from sftjax.config import base_config

    c = base_config()
    c.model.path = model_dir
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, fsdp, 1
    return c


def _child(mode: str, model_dir: str, port: int, pid: int, out: str) -> None:
    """One of two processes: load `model_dir` the `mode` way (sharded | old), measuring the growth
    of this process's peak resident memory, then gather what it placed."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import safetensors  # noqa: F401 (imported before the baseline)

    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    from sftjax.build import build, logical_axes, transforms
    from sftjax.io.hf import hf_to_params, read_hf_folder
    from sftjax.models.llama import Llama
    from sftjax.parallel import mesh as sharding
    from sftjax.peft.adapted import Adapted

    cfg = _two_process_config(model_dir, 2)

    def sharded():
        setup = build(cfg, object())  # the tokenizer plays no part in loading (the folder has none)
        return jax.block_until_ready({"frozen": setup.frozen, "trainable": setup.trainable})

    def old():  # before sharded loading: whole state dict, stacked copies, then placement
        mcfg, sd = read_hf_folder(model_dir)
        base = hf_to_params(sd, mcfg, model_dir)
        model = Adapted(Llama(mcfg), transforms(cfg))
        shardings = sharding.param_shardings(base, logical_axes(model, [base, {}]), sharding.make_mesh(cfg.mesh))
        return jax.block_until_ready({"frozen": sharding.place(base, shardings)})

    placed, growth = _peak_growth(sharded if mode == "sharded" else old)
    with open(out, "w") as f:
        json.dump({"growth": growth, "digests": {k: _digests(v) for k, v in placed.items()}}, f)


def _write_model(folder: str) -> dict:
    """A random untied Llama of 2 layers, hidden 1024, MLP 2048, vocab 8192: 144 MiB of float32."""
    import jax

    from sftjax.io.hf import open_folder, write_hf_folder
    from sftjax.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    shapes = jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32)))["params"]
    shapes = jax.tree.map(lambda x: getattr(x, "value", x), shapes, is_leaf=lambda x: hasattr(x, "value"))
    rng = np.random.default_rng(0)
    write_hf_folder(folder, cfg, jax.tree.map(lambda s: 0.02 * rng.standard_normal(s.shape, np.float32), shapes))
    tensors = [4 * math.prod(x.shape) for x in open_folder(folder)[1].values()]
    return {"model": sum(tensors), "largest": max(tensors)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_each_read_half(tmp_path):
    """Two processes, fsdp=2: while `build` loads, each one's peak resident memory grows by at most
    half the model + its largest tensor + 32 MB, and the old path (run by two other processes)
    exceeds that bound, so the test can fail. The 32 MB of slack: the process's share of one leaf,
    held while it is copied onto the device (16 MB here), and tracing the model (~8 MB).

    Measured on 2 shared cores (144.0 MB of float32, largest tensor 32.0 MB, bound 136.0 MB):
    sharded 122.9 / 122.8 MB per process (the placed half, 72 MB, + the pages of the tensor being read
    + one leaf's share in flight), old path 302.9 / 302.4 MB (the whole state dict, 144 MB, + stacked
    layer copies, 64 MB, + the placed half). Wall time ~38 s.
    """
    from sftjax.build import build

    folder = str(tmp_path / "model")
    size = _write_model(folder)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
    t0 = time.time()
    runs = {}
    for mode in ("sharded", "old"):
        port = _free_port()
        runs[mode] = [(subprocess.Popen([sys.executable, __file__, mode, folder, str(port), str(i), out], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out)
                      for i, out in enumerate(str(tmp_path / f"{mode}{i}.json") for i in range(2))]
    res = {}
    for mode, procs in runs.items():
        logs = [p.communicate(timeout=300)[0] for p, _ in procs]
        assert all(p.returncode == 0 for p, _ in procs), "\n".join(log[-3000:] for log in logs)
        res[mode] = [json.load(open(out)) for _, out in procs]
    bound = size["model"] / 2 + size["largest"] + 32 * MB
    print(f"model {size['model'] / MB:.1f} MB, largest tensor {size['largest'] / MB:.1f} MB, bound {bound / MB:.1f} MB; "
          + "; ".join(f"{m}: " + " / ".join(f"{r['growth'] / MB:.1f}" for r in rs) + " MB" for m, rs in res.items())
          + f"; {time.time() - t0:.1f} s")
    assert all(r["growth"] <= bound for r in res["sharded"]), [r["growth"] / MB for r in res["sharded"]]
    assert all(r["growth"] > bound for r in res["old"]), [r["growth"] / MB for r in res["old"]]
    # Every process gathered the same arrays; they equal the old path's and a one-process load's.
    d = res["sharded"][0]["digests"]
    assert all(r["digests"] == d for r in res["sharded"]) and all(r["digests"]["frozen"] == d["frozen"] for r in res["old"])
    one = build(_two_process_config(folder, 1), object())
    assert d == {"frozen": _digests(one.frozen), "trainable": _digests(one.trainable)}


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
