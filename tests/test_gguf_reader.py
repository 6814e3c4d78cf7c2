"""The fast GGUF paths read exactly what the `gguf` package reads.

- `gguf_file.Reader` (metadata arrays parsed in one pass) has the same fields as `GGUFReader`:
  offsets, parts byte for byte, data indices, types and contents, for string, integer, float and
  empty arrays and scalars.
- `gguf_file.dequantize` (the package's routine on runs of rows) equals `gguf.quants.dequantize`
  bit for bit for every quantised type the package can write, across several runs of rows.
"""

import numpy as np
import pytest


def _write(path, tensors):
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_string("general.name", "tiny")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "héllo", "", "Ġworld", "a" * 300])
    w.add_array("tokenizer.ggml.token_type", [3, 1, 1, 1, 1])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0])
    w.add_array("tokenizer.ggml.merges", [])
    for name, (data, kind) in tensors.items():
        w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_reader_and_dequantize_match_the_package(tmp_path):
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader
    from gguf.quants import dequantize as reference
    from gguf.quants import quantize

    from sftjax.io import gguf_file

    rng = np.random.default_rng(0)
    kinds = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
    tensors = {f"t.{k.name}": (quantize(rng.standard_normal((40, 96)).astype(np.float32), k), k) for k in kinds}
    tensors["norm"] = (rng.standard_normal(96).astype(np.float32), Q.F32)
    path = tmp_path / "tiny.gguf"
    _write(path, tensors)

    fast, ref = gguf_file.Reader(str(path)), GGUFReader(str(path))
    assert list(fast.fields) == list(ref.fields)
    for name, a in fast.fields.items():
        b = ref.fields[name]
        assert (a.offset, a.name, a.data, a.types) == (b.offset, b.name, b.data, b.types), name
        assert [(p.dtype, p.shape, p.tobytes()) for p in a.parts] == [(p.dtype, p.shape, p.tobytes()) for p in b.parts]
        assert a.contents() == b.contents(), name
    assert fast.fields["tokenizer.ggml.tokens"].contents(1) == "héllo"
    assert [t.name for t in fast.tensors] == [t.name for t in ref.tensors] and fast.data_offset == ref.data_offset

    for t in fast.tensors:
        want = np.asarray(reference(t.data, t.tensor_type), np.float32).reshape(-1, int(t.shape[0]))
        for rows in (1 << 20, 96 * 7):  # one run of rows, then runs of 7 rows (the last one short)
            gguf_file.ROWS_AT_ONCE = rows
            try:
                got = gguf_file.dequantize(t)
            finally:
                gguf_file.ROWS_AT_ONCE = 1 << 20
            assert got.dtype == np.float32 and got.shape == want.shape and got.tobytes() == want.tobytes(), t.name


@pytest.mark.parametrize("shape", [(40, 96), (96, 40), (1, 7)])
def test_tiled_copy_of_a_transpose(shape):
    from sftjax.io.lazy import copy

    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    dst = np.empty(shape[::-1], np.float32)
    copy(dst, x.T, rows=16, cols=8)
    assert dst.tobytes() == np.ascontiguousarray(x.T).tobytes()
