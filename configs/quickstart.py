"""Quickstart: LoRA fine-tune of SmolLM2-135M-Instruct (embedded) on TREC question types, on CPU.

Run:
    sftjax train --config=configs/quickstart.py --workdir=runs/quickstart

The data is the `trec` recipe (sftjax/data/recipes.py): 5,081 training questions (5,061 fit in
64 tokens), 300 held out of which the first 256 are evaluated, each answered with its answer type
in one word. Evaluation before and after training reports
held-out loss and exact match (the greedy reply equals the label), and the perplexity of general
chat (`recipe:chitchat`, data.forgetting) before and after: configs/trec_mix.py mixes chat back in
against that forgetting (figures in docs/tasks.md).
"""

from sftjax.config import base_config


def get_config():
    c = base_config()
    c.data.train = "recipe:trec"
    c.data.max_length = 64
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = ("attention",)
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 5
    c.train.steps = 100
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.eval_every = 0
    c.train.sample_eval = 4  # held-out questions answered before and after training
    c.checkpoint.every = 20
    c.model.dtype = "float32"
    c.data.forgetting = "recipe:chitchat"  # general chat perplexity before and after: what was forgotten
    return c
