"""SMS spam (ham / spam) with the embedded encoder all-MiniLM-L6-v2, full fine-tuning, [CLS] head.

Run:
    sftjax train --config=configs/sms_spam_encoder.py --workdir=runs/sms_spam_encoder
    sftjax eval --workdir=runs/sms_spam_encoder      # report, confusion matrix -> eval.json

The `sms_spam` recipe: 4,222 training messages (12.6% spam), 300 held out. Class weights balance
the loss (task.balance_classes). Measured figures: docs/tasks.md.
"""

from sftjax.config import base_config


def get_config():
    c = base_config()
    c.model.path = "all-minilm-l6-v2"
    c.task.type = "classification"
    c.task.balance_classes = True
    c.data.train = "recipe:sms_spam"
    c.data.labels = ("ham", "spam")
    c.data.max_length = 128
    c.data.max_eval_examples = 300  # the whole held-out split
    c.lora.enabled = False  # full fine-tuning: 22.7M parameters
    c.optim.lr = 5e-5
    c.optim.warmup_ratio = 0.1
    c.train.steps = 150
    c.train.batch_size = 16
    c.train.log_every = 20
    c.train.eval_every = 75
    c.checkpoint.every = 75
    return c
