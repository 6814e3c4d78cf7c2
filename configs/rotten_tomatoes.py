"""Rotten Tomatoes sentiment (fresh / rotten) with the embedded encoder all-MiniLM-L6-v2, full fine-tuning.

Run:
    sftjax train --config=configs/rotten_tomatoes.py --workdir=runs/rotten_tomatoes
    sftjax eval --workdir=runs/rotten_tomatoes

The `rotten_tomatoes` recipe: 12,452 review snippets to train, 300 held out; mean pooling over
the tokens. Measured figures: docs/tasks.md.
"""

from sftjax.config import base_config


def get_config():
    c = base_config()
    c.model.path = "all-minilm-l6-v2"
    c.task.type = "classification"
    c.task.pooling = "mean"
    c.data.train = "recipe:rotten_tomatoes"
    c.data.labels = ("fresh", "rotten")
    c.data.max_length = 128
    c.data.max_eval_examples = 300  # the whole held-out split
    c.lora.enabled = False
    c.optim.lr = 5e-5
    c.train.steps = 200
    c.train.batch_size = 16
    c.train.log_every = 50
    c.train.eval_every = 100
    c.checkpoint.every = 100
    return c
