"""sftjax vs transformers (torch, CPU, fp32) on the real SmolLM2-135M-Instruct weights."""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity needs the test extra: pip install -e .[test]")

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Question: why is the sky blue?\nAnswer:", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def both():
    from transformers import AutoModelForCausalLM

    from sftjax.io.load import embedded_model_path, load_pretrained
    from sftjax.models.llama import Llama

    cfg, params, tok = load_pretrained("smollm2-135m-instruct")
    path = embedded_model_path()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32)
    ref.eval()
    return Llama(cfg), params, tok, ref


def test_logits_match_transformers_on_padded_batch(both):
    model, params, tok, ref = both
    enc = tok(PROMPTS, padding=True, return_tensors="np")
    ids, am = enc["input_ids"], enc["attention_mask"]
    assert (am == 0).any(), "the batch must contain padding"
    ours = np.asarray(jax.jit(lambda p, i, v: model.apply({"params": p}, i, v))(params, ids, am.astype(bool)))
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am)).logits.numpy()
    err = np.abs(ours - theirs)[am.astype(bool)].max()
    print(f"\nmax abs logit difference vs transformers: {err:.2e}")
    assert err <= 1e-3


def test_greedy_generation_matches_transformers(both):
    from sftjax.infer.generate import greedy
    from sftjax.peft.adapted import Adapted

    model, params, tok, ref = both
    prompts = [np.asarray(tok(p)["input_ids"], np.int32) for p in PROMPTS[:2]]
    ours = greedy(Adapted(model), params, prompts, 16, eos_id=None, pad_id=tok.pad_token_id)
    for p, o in zip(prompts, ours, strict=True):
        with torch.no_grad():
            theirs = ref.generate(torch.tensor(p[None]), max_new_tokens=16, do_sample=False,
                                  attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].numpy()
        assert o.tolist() == theirs.tolist(), (tok.decode(o), tok.decode(theirs))


def test_gguf_tokenizer_matches_transformers(both):
    from transformers import AutoTokenizer

    from sftjax.io.load import embedded_model_path

    _, _, tok, _ = both
    path = embedded_model_path()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    texts = PROMPTS + ["<|im_start|>user\nHéllo wörld 12345 — ok?<|im_end|>\n", "  leading spaces\ttabs\n\n"]
    for t in texts:
        assert tok(t)["input_ids"] == ref(t)["input_ids"], t
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)
