"""Twitter named entities (10 types, BIO) with the embedded encoder all-MiniLM-L6-v2, full fine-tuning.

Run:
    sftjax train --config=configs/twitter_ner.py --workdir=runs/twitter_ner
    sftjax eval --workdir=runs/twitter_ner           # seqeval entity-level report -> eval.json

The `ner` recipe: 2,109 tweets to train, 200 held out. Each word's first sub-token carries its
BIO tag (the other sub-tokens are not scored); scores are seqeval's entity-level precision,
recall and F1. Measured figures: docs/tasks.md.
"""

from sftjax.config import base_config
from sftjax.data.recipes import NER_TYPES


def get_config():
    c = base_config()
    c.model.path = "all-minilm-l6-v2"
    c.task.type = "token_classification"
    c.data.train = "recipe:ner"
    c.data.labels = NER_TYPES
    c.data.max_length = 96
    c.lora.enabled = False
    c.optim.lr = 1e-4
    c.train.steps = 200
    c.train.batch_size = 16
    c.train.log_every = 50
    c.train.eval_every = 100
    c.checkpoint.every = 100
    c.checkpoint.best_metric = "f1"
    c.checkpoint.best_mode = "max"
    return c
