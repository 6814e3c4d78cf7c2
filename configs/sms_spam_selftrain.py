"""Self-training on SMS spam (ham / spam) with the embedded encoder all-MiniLM-L6-v2: a teacher on 1%
of the labelled training messages pseudo-labels the rest, three rounds of students.

Run:
    sftjax selftrain --config=configs/sms_spam_selftrain.py --workdir=runs/selftrain_1pct
    sftjax selftrain --config=configs/sms_spam_selftrain.py --workdir=runs/selftrain_5pct \\
        --config.selftrain.labelled=0.05

The `sms_spam` recipe: 4,222 training messages (12.6% spam), 300 held out (the same for every
round). 1% keeps 42 labels (37 ham, 5 spam). Every round (teacher and each student) trains
train.steps steps of full fine-tuning from the base model; WORKDIR/selftrain.json holds each round's
pseudo-label counts and accuracy, held-out accuracy and macro F1, and the student's gain.
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
    c.train.steps = 100
    c.train.batch_size = 16
    c.train.log_every = 20
    c.checkpoint.every = 100
    c.selftrain.labelled = 0.01
    c.selftrain.rounds = 3
    c.selftrain.threshold = 0.9
    return c
