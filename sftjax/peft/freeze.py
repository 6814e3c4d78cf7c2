"""Freezing strategies as path-regex rules.

Every strategy ends up as a list of regexes over parameter paths (`params.matching`), so "what
trains" is always one filter, printed at start with the trainable count. Layer-wise rules need
one subtree per layer (`model.scan_layers=False`, see `models/layout.py`): "the last N layers" is
then the regex `^layers_(L-N|..|L-1)/`.
"""

from __future__ import annotations

from sftjax.errors import UserError
from sftjax.models.layout import unrolled_pattern


def head_patterns(tied: bool, lm_head: bool = True) -> list[str]:
    """The output head and the final norm (a tied head is the input embedding); with a task head
    (`lm_head` False) only the norm: the task head is added to the trainable set on its own."""
    if not lm_head:
        return [r"^norm/"]
    return [r"^norm/", r"^embed_tokens/" if tied else r"^lm_head/"]


def trainable_patterns(train_cfg, num_layers: int, tied: bool, lm_head: bool = True) -> list[str]:
    """Regexes of trainable parameters for `train.freeze` (without LoRA / prompt tuning); the
    option itself was checked by `config.validate`, the layer count needs the model."""
    kind = train_cfg.freeze
    if kind == "full":
        return [".*"]
    if kind == "head":
        return head_patterns(tied, lm_head)
    if kind == "last_layers":
        n = int(train_cfg.last_layers)
        if not 0 < n <= num_layers:
            raise UserError(f"train.last_layers: must be in 1..{num_layers} (the model's layer count), got {n}")
        return [unrolled_pattern(range(num_layers - n, num_layers))] + head_patterns(tied, lm_head)
    return list(train_cfg.trainable)  # regex
