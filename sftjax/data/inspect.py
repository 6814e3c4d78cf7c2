"""Show what the model is trained on: examples with their target (loss) tokens highlighted.

The same view serves `sftjax data inspect` (a terminal: colour, or [[brackets]] when piped)
and TensorBoard (markdown: targets in bold), so what a user checks is what the step sees.
"""

from __future__ import annotations

import numpy as np

STYLES = {
    "ansi": ("\033[1;32m", "\033[0m"),
    "brackets": ("[[", "]]"),
    "markdown": ("**", "**"),
}


def highlight(tokenizer, ids: np.ndarray, mask: np.ndarray, style: str = "brackets") -> str:
    """Decode `ids`, wrapping each run of target tokens in the style's markers."""
    start, end = STYLES[style]
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and mask[j] == mask[i]:
            j += 1
        text = tokenizer.decode(ids[i:j].tolist(), skip_special_tokens=False)
        if style == "markdown":
            text = text.replace("*", "\\*").replace("\n", "  \n")
        out.append(f"{start}{text}{end}" if mask[i] else text)
        i = j
    return "".join(out)


def summary(store, name: str) -> str:
    """One line: examples, tokens and the trained fraction of a TokenStore."""
    return (f"{name}: {len(store)} examples, {len(store.ids)} tokens, {100 * store.target_fraction():.1f}% trained, "
            f"length min/median/max {int(store.lengths.min())}/{int(np.median(store.lengths))}/"
            f"{int(store.lengths.max())}")


def inspect(cfg, n: int, style: str) -> str:
    """The `sftjax data inspect` report: per-source counts, then `n` examples of each source."""
    from sftjax.data import pipeline
    from sftjax.io.load import load_tokenizer

    tok = load_tokenizer(cfg.model.path)
    data = pipeline.load(cfg, tok)
    lines = []
    for name, store in zip(data.names, data.train, strict=True):
        lines.append(summary(store, name))
        lines.append(f"  {data.report[name]}")
        for i in range(min(n, len(store))):
            ids, mask = store.example(i)
            lines += [f"--- {store.wheres[i]} ({len(ids)} tokens, {int(mask.sum())} trained)",
                      highlight(tok, ids, mask, style)]
    if data.eval is not None:
        lines.append(f"eval data: {len(data.eval)} examples")
    return "\n".join(lines)
