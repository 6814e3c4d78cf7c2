"""TREC question types as classification: SmolLM2-135M-Instruct (embedded), LoRA + a 6-way head on
the last token. The same data, adapters and budget as configs/quickstart.py, which trains the
answer type generatively (the label word as the reply): compare the two in docs/tasks.md.

Run:
    sftjax train --config=configs/trec_classification.py --workdir=runs/trec_classification
    sftjax eval --workdir=runs/trec_classification
"""

from sftjax.config import base_config
from sftjax.data.recipes import TREC_LABELS


def get_config():
    c = base_config()
    c.task.type = "classification"
    c.data.train = "recipe:trec"
    c.data.labels = tuple(TREC_LABELS.values())
    c.data.max_length = 64
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = ("attention",)
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 5
    c.train.steps = 100
    c.train.batch_size = 8
    c.train.log_every = 5
    c.checkpoint.every = 20
    return c
