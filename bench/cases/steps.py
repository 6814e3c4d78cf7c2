"""Dense training steps: SmolLM2-135M-Instruct (the embedded GGUF, dequantised to float32 on both
sides), random tokens, loss on every token, AdamW with gradient clipping at 1.0, one optimizer
step per batch. bf16 means bfloat16 compute over float32 master weights on both sides (sftjax
`model.dtype=bfloat16`, torch `autocast`)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.cases import FIRST_STEP, PEAK_RSS, Case, Measure, timed

PEFT_TARGETS = {"qv": ["q_proj", "v_proj"],
                "all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@dataclass(frozen=True)
class Dense:
    method: str  # lora | full
    targets: str  # qv | all_linear (LoRA r=8, alpha=16)
    dtype: str  # float32 | bfloat16
    batch: int = 8
    length: int = 256


def tokens(spec: Dense):
    """The same random token rows for both sides: [batch, length + 1] int32."""
    import numpy as np

    return np.random.default_rng(0).integers(0, 49152, (spec.batch, spec.length + 1)).astype(np.int32)


def timed_steps(step, a) -> dict:
    """`bench.cases.timed` of `step()`, blocking on what it returns (jax arrays, or None)."""
    def run():
        out = step()
        if out is not None:
            import jax

            jax.block_until_ready(out)

    first, per_step, _ = timed(run, a)
    return {"step_s": per_step, "first_step_s": first}


def jax_side(spec: Dense, a) -> dict:
    import jax
    import numpy as np

    from sftjax.build import build
    from sftjax.config import base_config
    from sftjax.parallel.flops import batch_flops, measured_cpu_peak, setup_cost
    from sftjax.parallel.mesh import place_batch
    from sftjax.train.step import init_state, make_train_step

    cfg = base_config()
    cfg.lora.enabled = spec.method == "lora"
    cfg.lora.targets = (spec.targets,)
    cfg.model.dtype = spec.dtype
    cfg.mesh.data = 1
    setup = build(cfg)
    state, tx, sched = init_state(setup, cfg.optim, cfg.train.steps)
    fn = make_train_step(setup.model, tx, sched, 1, False, 0, jax.tree.map(lambda x: x.sharding, state))
    ids = tokens(spec)
    host = {"input_ids": ids[:, :-1], "valid": np.ones((spec.batch, spec.length), bool), "labels": ids[:, 1:],
            "weights": np.ones((spec.batch, spec.length), np.float32)}
    batch = place_batch(host, setup.mesh)
    box = [state]

    def step():
        box[0], m = fn(box[0], setup.frozen, batch)
        return m

    out = timed_steps(step, a)
    flops = batch_flops(setup_cost(cfg, setup.model_cfg, setup.trainable, setup.frozen), host)
    out["tokens_per_s"] = spec.batch * spec.length / out["step_s"]
    out["flops_per_step"] = flops
    out["peak_flops"] = measured_cpu_peak(spec.dtype)
    out["mfu"] = flops / out["step_s"] / out["peak_flops"]
    return out


def torch_side(spec: Dense, a) -> dict:
    import contextlib
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from sftjax.io.load import embedded_model_path

    if spec.dtype == "bfloat16":
        from bench.cases.peak import torch_matmul_flops

        probe = torch_matmul_flops(torch.bfloat16, 256, 1)
        if probe < 5e9:
            raise SystemExit(f"not run: torch's bf16 matmul runs at {probe / 1e9:.2f} GFLOP/s on this CPU (no bf16 "
                             "instructions); one step would take hours")
    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    if spec.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS[spec.targets]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = torch.from_numpy(tokens(spec)).long()
    inputs, labels = ids[:, :-1], ids[:, 1:]
    def cast():  # a fresh context per step
        return torch.autocast("cpu", dtype=torch.bfloat16) if spec.dtype == "bfloat16" else contextlib.nullcontext()

    def step():
        with cast():
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = timed_steps(step, a)
    out["tokens_per_s"] = spec.batch * spec.length / out["step_s"]
    out["threads"] = torch.get_num_threads()
    return out


MEASURES = (Measure("tokens_per_s", "tokens/s", "rate"), Measure("step_s", "s/step", "time", "s"),
            FIRST_STEP, Measure("mfu", "CPU MFU", "rate", "%"),
            PEAK_RSS)


def case(what: str, spec: Dense) -> Case:
    return Case(what, lambda a: jax_side(spec, a), lambda a: torch_side(spec, a), MEASURES)


CASES = {
    "lora_qv_fp32": case("LoRA r=8 on q,v, float32, 8x256", Dense("lora", "qv", "float32")),
    "lora_all_fp32": case("LoRA r=8 on all linear layers, float32, 8x256", Dense("lora", "all_linear", "float32")),
    "full_fp32": case("full fine-tuning, float32, 8x256", Dense("full", "qv", "float32")),
    "lora_qv_bf16": case("LoRA r=8 on q,v, bf16 compute over float32 weights, 8x256", Dense("lora", "qv", "bfloat16")),
    "lora_qv_1024": case("LoRA r=8 on q,v, float32, 8x1024", Dense("lora", "qv", "float32", length=1024)),
}
