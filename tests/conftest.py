"""Shared fixtures. The 8 fake CPU devices must be set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's real tokenizer and chat template, rebuilt from the embedded GGUF's metadata."""
    from gguf import GGUFReader

    from sftjax.io.gguf_file import tokenizer_from_gguf
    from sftjax.io.load import embedded_model_path

    path = embedded_model_path()
    return tokenizer_from_gguf(GGUFReader(path), path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A random 2-layer Llama with SmolLM2's tokenizer, written as a HF folder."""
    from sftjax.io.hf import write_hf_folder
    from sftjax.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    params = Llama(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    params = jax.tree.map(lambda x: np.asarray(getattr(x, "value", x)), params,
                          is_leaf=lambda x: hasattr(x, "value"))
    out = str(tmp_path_factory.mktemp("models") / "tiny-llama")
    write_hf_folder(out, cfg, params, smol_tokenizer)
    return out


@pytest.fixture
def tiny_config(tiny_model_dir):
    """A complete, small training config on the tiny model and the test chat data."""
    from sftjax.config import base_config

    c = base_config()
    c.model.path = tiny_model_dir
    c.data.train = os.path.join(DATA, "chat.jsonl")
    c.data.eval_fraction = 0.2
    c.data.max_length = 64
    c.data.buckets = 1  # one batch shape: each run compiles its step once (tests that need buckets set them)
    c.train.steps = 2
    c.train.batch_size = 8
    c.train.log_every = 1
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 0
    c.checkpoint.every = 1
    c.mesh.data = 1
    return c
