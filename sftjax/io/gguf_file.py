"""GGUF files -> (LlamaConfig, HF state dict, tokenizer), using the `gguf` package's reader.

Tensors are dequantised to float32 with `gguf.quants.dequantize` and renamed to HF names; llama's
q/k weights are un-permuted from llama.cpp's rotary layout back to HF's (the converter permutes
them for llama only, not for qwen2). The tokenizer (byte-level BPE) and chat template are rebuilt
from the metadata with `tokenizers`, so no PyTorch is needed to read a GGUF file.

Tensors are lazy leaves (`io/lazy.py`) over the reader's memory map. A quantised tensor cannot be
read by slices (its blocks of 32-256 values with their scales do not follow the slice
boundaries, and the q/k un-permutation moves rows), so reading any slice of one decodes the whole
tensor, once for all the slices asked for together: with GGUF the host-memory bound of loading is
one tensor at a time, not one slice. Float (F32/F16) tensors that need no un-permutation are read
by slices from the map. The mapped file pages that were touched count towards resident memory
until the kernel reclaims them (they are clean page cache, not allocations).
"""

from __future__ import annotations

import os
import re
import struct

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from sftjax.errors import UserError
from sftjax.io.hf import config_from_hf
from sftjax.io.lazy import Lazy, materialise, normalise
from sftjax.models.llama import LlamaConfig

_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Reader(GGUFReader):
    """`gguf.GGUFReader` with metadata arrays parsed in one pass: the same fields, parts and
    contents, ~50x faster on a real vocabulary.

    The library reads each element of an array (one string of the vocabulary, one merge) through
    two or more `np.memmap` views, and numpy's memmap subclass makes every view cost microseconds:
    Qwen2.5's 151,936 tokens and 151,387 merges took ~19 s to parse on 2 cores, before any weight
    was read. Here an array's elements are sliced from a plain ndarray view of the same map,
    lengths read with `struct`. Nested arrays and byte-swapped files keep the library's path."""

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw = self.data.view(np.ndarray)  # the same bytes, without memmap's per-view bookkeeping
        raw_itype, alen = raw[orig_offs:orig_offs + 4].view(np.uint32), raw[orig_offs + 4:orig_offs + 12].view(np.uint64)
        itype, n, offs = GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
        parts: list[np.ndarray] = [raw_itype, alen]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:  # one view of all n values, then one part per value (as the library has)
            values = raw[offs:offs + n * np.dtype(nptype).itemsize].view(nptype)
            parts += [values[i:i + 1] for i in range(n)]
            offs += values.nbytes
        elif itype == GGUFValueType.STRING:  # each string: its uint64 length, then its bytes
            for _ in range(n):
                (size,) = struct.unpack_from("<Q", raw, offs)
                parts += [raw[offs:offs + 8].view(np.uint64), raw[offs + 8:offs + 8 + size]]
                offs += 8 + size
        else:
            return super()._get_field_parts(orig_offs, raw_type)
        data = list(range(2, len(parts))) if nptype is not None else list(range(3, len(parts), 2))
        return offs - orig_offs, parts, data, [GGUFValueType.ARRAY] + ([itype] if n else [])


def open_gguf(path: str) -> Reader:
    """A `Reader` over `path` (memory-mapped), or a clean error for a missing/damaged file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: GGUF file not found")
    try:
        return Reader(path)
    except Exception as e:  # the reader raises bare ValueErrors on a damaged file
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None


class GGUFTensor(Lazy):
    """One GGUF tensor in HF layout ([out, in]), float32; `heads`: un-permute its rows (llama q/k)."""

    def __init__(self, tensor, heads: int | None = None):
        self.tensor, self.heads = tensor, heads
        self.shape = tuple(reversed([int(d) for d in tensor.shape]))

    def read_many(self, indices):
        t = self.tensor
        indices = [normalise(i, self.shape) for i in indices]
        if t.tensor_type in FLOATS and self.heads is None:  # sliceable as stored
            data = np.asarray(t.data).reshape(self.shape)
            return [data[i].astype(np.float32) for i in indices]
        w = dequantize(t).reshape(self.shape)
        if self.heads is not None:
            w = _unpermute(w, self.heads)
        whole = normalise(None, self.shape)
        # The whole tensor is `w` itself; a part is copied, so that it does not keep `w` alive.
        return [w if i == whole else np.array(w[i]) for i in indices]


FLOATS = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
ROWS_AT_ONCE = 1 << 20  # values dequantised per call: big enough for numpy, small for the cache


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 [rows, row length], with `gguf.quants`' own routine for its type,
    called on runs of whole rows of ~1M values written straight into the result.

    `gguf.quants.dequantize` gives the same values (blocks are independent), but calls the routine
    on groups of 16 rows through `np.memmap` views and copies the result: ~3x slower, and it was
    most of the load time of a quantised model. Types without a blockwise routine use it as is."""
    import gguf.quants

    kind = getattr(gguf.quants, tensor.tensor_type.name, None)
    raw = tensor.data.view(np.ndarray)  # the mapped bytes, without memmap's per-view bookkeeping
    if tensor.tensor_type in FLOATS or not hasattr(kind, "dequantize_rows"):
        return np.array(gguf.quants.dequantize(raw, tensor.tensor_type), np.float32).reshape(-1, int(tensor.shape[0]))
    kind.init_grid()  # the lattice of the i-quants (a no-op for the others)
    raw = raw.reshape(-1, raw.shape[-1])
    out = np.empty((raw.shape[0], int(tensor.shape[0])), np.float32)
    step = max(1, ROWS_AT_ONCE // out.shape[1])
    for i in range(0, len(raw), step):
        out[i:i + step] = kind.dequantize_rows(raw[i:i + step])
    return out


def open_model(path: str, reader: Reader | None = None) -> tuple[LlamaConfig, dict[str, Lazy]]:
    """(LlamaConfig, lazy HF-named float32 state dict); only the metadata is read here (`reader`:
    `path` already open). The tokenizer: `tokenizer_from_gguf`."""
    reader = reader if reader is not None else open_gguf(path)
    arch = _field(reader, "general.architecture")
    a = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    n_head, n_kv = a("attention.head_count"), a("attention.head_count_kv") or a("attention.head_count")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    hf = {
        "model_type": arch,
        "vocab_size": a("vocab_size") or len(tokens),
        "hidden_size": a("embedding_length"),
        "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": a("attention.key_length"),
        "rms_norm_eps": a("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": a("rope.freq_base", 10000.0),
        "max_position_embeddings": a("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if a("rope.scaling.type") == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": a("rope.scaling.factor")}
    cfg: LlamaConfig = config_from_hf(hf, path)

    sd: dict[str, Lazy] = {}
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
        if m:
            layer, kind, what = m.groups()
            heads = None
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                heads = n_head if kind == "attn_q" else n_kv
            sd[f"model.layers.{layer}.{_NAMES[kind]}.{what}"] = GGUFTensor(t, heads)
        elif t.name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = GGUFTensor(t)
        elif t.name == "output_norm.weight":
            sd["model.norm.weight"] = GGUFTensor(t)
        elif t.name == "output.weight":
            sd["lm_head.weight"] = GGUFTensor(t)
    return cfg, sd


def read_gguf(path: str) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """`open_model`, every tensor dequantised whole into float32 numpy."""
    cfg, sd = open_model(path)
    return cfg, materialise(sd)


def tokenizer_from_gguf(reader, path: str):
    """Rebuild a byte-level BPE tokenizer (with chat template and special tokens) from metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise UserError(f"{path}: only byte-level BPE (gpt2-style) GGUF tokenizers are supported; "
                        "convert the model to a HF folder with its tokenizer.json instead")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty == 3])

    def special(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special("bos"), eos_token=special("eos"),
        pad_token=special("padding") or special("eos"), unk_token=special("unknown"),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
