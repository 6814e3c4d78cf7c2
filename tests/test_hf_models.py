"""HF-folder loading and model numerics vs transformers on small random models of each family."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the test extra: pip install -e .[test]")


def _llama3_scaled():
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, rope_parameters=rope)
    return LlamaForCausalLM(cfg)


def _qwen2_biases_tied():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    return Qwen2ForCausalLM(cfg)


@pytest.mark.parametrize("make", [_llama3_scaled, _qwen2_biases_tied], ids=["llama3-rope-untied", "qwen2-bias-tied"])
def test_random_model_logits_match_transformers(tmp_path, make):
    from sftjax.io.hf import hf_to_params, read_hf_folder
    from sftjax.models.llama import Llama

    torch.manual_seed(0)
    ref = make().eval()
    with torch.no_grad():  # HF zero-initialises biases; make them matter
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    ref.save_pretrained(tmp_path)
    cfg, sd = read_hf_folder(str(tmp_path))
    assert cfg.model_type == ref.config.model_type
    params = hf_to_params(sd, cfg, str(tmp_path))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 320, (2, 80)).astype(np.int32)
    valid = np.ones_like(ids, bool)
    valid[1, 50:] = False  # right padding on the second row
    ours = np.asarray(Llama(cfg).apply({"params": params}, ids, valid))
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(valid.astype(np.int64))).logits.numpy()
    err = np.abs(ours - theirs)[valid].max()
    assert err <= 1e-4, err
