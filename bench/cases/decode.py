"""Greedy generation: SmolLM2-135M-Instruct (the embedded GGUF, float32 on both sides), prompts of
32 random tokens, 64 new tokens each, at batch 1 and batch 8.

sftjax: `generator(model).greedy(params, prompts, 64, eos_id=None)`; torch: `model.generate(ids,
do_sample=False, max_new_tokens=64)` with EOS switched off, so neither side stops early (both are
checked to have produced 64 tokens per row). One call per batch size is untimed first (sftjax
compiles there: reported as "first call"), then `--warmup` untimed and `--steps` timed calls.
"""

from __future__ import annotations

from bench.cases import PEAK_RSS, Case, Measure, timed

BATCHES = (1, 8)
PROMPT, NEW = 32, 64


def prompts(batch: int):
    """The same random prompts for both sides: [batch, PROMPT] int32 (no padding needed)."""
    import numpy as np

    return np.random.default_rng(batch).integers(0, 49152, (batch, PROMPT)).astype(np.int32)


def timed_decode(call, batch: int, a) -> dict:
    """Tokens/s of `call()` (returns [batch, NEW] generated ids) by `bench.cases.timed`."""
    first, per_call, out = timed(call, a)
    if tuple(out.shape) != (batch, NEW):
        raise SystemExit(f"batch {batch}: generated {tuple(out.shape)}, want {(batch, NEW)}")
    return {f"decode_b{batch}_tok_s": batch * NEW / per_call, f"decode_b{batch}_first_s": first}


def jax_side(a) -> dict:
    import numpy as np

    from sftjax.build import build
    from sftjax.config import base_config
    from sftjax.infer.generate import generator

    cfg = base_config()
    cfg.lora.enabled = False
    cfg.model.dtype = "float32"
    cfg.mesh.data = 1
    setup = build(cfg)
    params, gen = setup.full_params(), generator(setup.model)
    out = {}
    for b in BATCHES:
        rows = list(prompts(b))
        out |= timed_decode(lambda rows=rows: np.stack(gen.greedy(params, rows, NEW, eos_id=None)), b, a)
    return out


def torch_side(a) -> dict:
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from sftjax.io.load import embedded_model_path

    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # never stop early: every row generates NEW tokens
    model.generation_config.pad_token_id = 0
    out = {}
    for b in BATCHES:
        ids = torch.from_numpy(prompts(b)).long()

        def call(ids=ids):
            with torch.inference_mode():
                seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW)
            return seq[:, PROMPT:]

        out |= timed_decode(call, b, a)
    out["threads"] = torch.get_num_threads()
    return out


CASES = {
    "decode": Case(f"greedy generation, SmolLM2-135M float32, {PROMPT}-token prompts, {NEW} new tokens",
                   jax_side, torch_side,
                   (Measure("decode_b1_tok_s", "batch 1 tokens/s", "rate"),
                    Measure("decode_b8_tok_s", "batch 8 tokens/s", "rate"),
                    Measure("decode_b1_first_s", "batch 1 first call", "info", "s"),
                    Measure("decode_b8_first_s", "batch 8 first call", "info", "s"), PEAK_RSS)),
}
