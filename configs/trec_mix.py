"""TREC answer types mixed with general chat against forgetting, packed: LoRA on SmolLM2-135M.

Run:
    sftjax data inspect --config=configs/trec_mix.py      # counts per source, masked examples
    sftjax train --config=configs/trec_mix.py --workdir=runs/trec_mix

80% of the examples are `recipe:trec` questions (answer with the answer type), 20% are
`recipe:moviedialog` statement/reply pairs, so the model keeps answering ordinary chat while
it learns the task. Examples are packed into rows of 64 tokens (segment ids keep them apart);
TensorBoard shows the loss of each source (train/loss/trec, train/loss/moviedialog) and the
held-out loss of each. data.forgetting measures general chat (`recipe:chitchat`) perplexity
before and after, as configs/quickstart.py does without the mixture (docs/tasks.md).
"""

from sftjax.config import base_config


def get_config():
    c = base_config()
    c.data.mixture = (("recipe:trec", 0.8), ("recipe:moviedialog", 0.2))
    c.data.max_length = 64  # as configs/quickstart.py, so general-data perplexities compare
    c.data.packing = True
    c.data.max_eval_examples = 128  # per source
    c.data.forgetting = "recipe:chitchat"  # general chat, trained on by neither recipe
    c.lora.rank = 8
    c.lora.targets = ("attention",)
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 5
    c.train.steps = 100
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.sample_eval = 4
    c.checkpoint.every = 20
    return c
