"""SMS spam (ham / spam) on SmolLM2-135M-Instruct (embedded): LoRA + a classification head on the
last non-pad token.

Run:
    sftjax train --config=configs/sms_spam_lora_head.py --workdir=runs/sms_spam_lora_head
    sftjax eval --workdir=runs/sms_spam_lora_head     # report, confusion matrix -> eval.json

The `sms_spam` recipe: 4,222 training messages (12.6% spam), 300 held out. The vocabulary head is
replaced by a 2-way `score` head (trained with the adapters); class weights balance the loss.
Measured figures: docs/tasks.md.
"""

from sftjax.config import base_config


def get_config():
    c = base_config()
    c.task.type = "classification"
    c.task.balance_classes = True
    c.data.train = "recipe:sms_spam"
    c.data.labels = ("ham", "spam")
    c.data.max_length = 96
    c.data.max_eval_examples = 300  # the whole held-out split
    c.lora.rank = 8
    c.lora.targets = ("attention",)
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.train.steps = 120
    c.train.batch_size = 8
    c.train.log_every = 10
    c.checkpoint.every = 60
    return c
