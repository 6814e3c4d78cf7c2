"""Scores of label predictions against gold labels: accuracy, per-class and averaged F1, and the
confusion matrix as numbers, a printable table and an image for TensorBoard."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from sftjax.scores.checks import paired

CELL = 48  # pixels per confusion-matrix cell in confusion_image
PAD = 8


def classification_scores(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """Accuracy, F1 and the confusion matrix over the label set `labels`, in its order.

    A prediction outside `labels` (a generated answer that names no class) counts as wrong: it lowers
    accuracy and its gold class's recall, is no false positive of any class, and has no column in the
    confusion matrix; "unlisted" counts them. A gold label outside `labels` raises ValueError, since
    the label set is then wrong rather than the model.

    Returns:
        {"accuracy", "macro_f1", "weighted_f1": float, "unlisted": int,
         "per_class": {label: {"precision", "recall", "f1": float, "support": int}},
         "confusion": list of lists of int, rows gold and columns predicted, both in `labels` order}.
        Precision of a class never predicted is 0 (scikit-learn's zero_division=0), not a warning.
    """
    paired(gold, pred, ("gold labels", "predictions"))
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be non-empty and distinct, got {labels!r}")
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        raise ValueError(f"gold labels {unknown!r} are not in labels {labels!r}")
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    averaged = {avg: precision_recall_fscore_support(gold, pred, labels=labels, average=avg, zero_division=0)[2]
                for avg in ("macro", "weighted")}
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(averaged["macro"]),
        "weighted_f1": float(averaged["weighted"]),
        "unlisted": sum(x not in labels for x in pred),
        "per_class": {label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, label in enumerate(labels)},
        "confusion": confusion_matrix(gold, pred, labels=labels).tolist(),
    }


def confusion_text(matrix: list[list[int]], labels: list[str]) -> str:
    """The matrix as a fixed-width table, rows gold and columns predicted, for logs and the console."""
    corner = "gold \\ pred"
    width = max(len(str(x)) for x in [*labels, *(v for row in matrix for v in row)])
    first = max(len(corner), *(len(x) for x in labels))
    lines = [f"{corner:<{first}}  " + "  ".join(f"{x:>{width}}" for x in labels)]
    lines += [f"{label:<{first}}  " + "  ".join(f"{v:>{width}}" for v in row) for label, row in zip(labels, matrix, strict=True)]
    return "\n".join(lines)


def confusion_image(matrix: list[list[int]], labels: list[str]) -> np.ndarray:
    """The matrix as an HxWx3 uint8 heat map with counts in the cells and label names on both axes,
    for `SummaryWriter.add_image(tag, image, step, dataformats="HWC")`.

    Cells shade from white to blue by count over the largest count, so the diagonal stands out and
    the image's size grows with the number of labels (CELL pixels a class). Drawn with PIL's built-in
    font: no matplotlib and no font file to find.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(labels)
    if counts.shape != (n, n):
        raise ValueError(f"matrix of shape {counts.shape} for {n} labels")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    names = [size(x) for x in labels]
    corner = "gold \\ pred"
    left = max(size(corner)[0], *(w for w, _ in names)) + 2 * PAD  # row labels, horizontal
    top = max(w for w, _ in names) + 2 * PAD  # column labels, drawn rotated to read upwards
    image = Image.new("RGB", (left + n * CELL + PAD, top + n * CELL + PAD), "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, top - PAD - size(corner)[1]), corner, font=font, fill="gray")
    peak = max(int(counts.max()), 1)
    for i in range(n):
        for j in range(n):
            share = counts[i, j] / peak
            fill = tuple(int(round(255 + share * (c - 255))) for c in (8, 48, 107))  # white -> dark blue
            x, y = left + j * CELL, top + i * CELL
            draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], fill=fill, outline=(200, 200, 200))
            text = str(counts[i, j])
            w, h = size(text)
            draw.text((x + (CELL - w) / 2, y + (CELL - h) / 2), text, font=font, fill="white" if share > 0.5 else "black")
    for k, (label, (w, h)) in enumerate(zip(labels, names, strict=True)):
        draw.text((left - PAD - w, top + k * CELL + (CELL - h) / 2), label, font=font, fill="black")
        tile = Image.new("RGB", (w + 2, h + 4), "white")
        ImageDraw.Draw(tile).text((1, 0), label, font=font, fill="black")
        tile = tile.rotate(90, expand=True)
        image.paste(tile, (left + k * CELL + (CELL - tile.width) // 2, top - PAD - tile.height))
    return np.asarray(image, dtype=np.uint8)


def report_text(scores: dict, labels: list[str]) -> str:
    """A per-class table of precision, recall, F1 and support, then accuracy and the averaged F1s,
    from `classification_scores`'s result; like scikit-learn's classification_report, without
    recomputing anything."""
    first = max(len("weighted f1"), *(len(x) for x in labels))
    lines = [f"{'':<{first}}  precision     recall         f1    support"]
    for label in labels:
        c = scores["per_class"][label]
        lines.append(f"{label:<{first}}  {c['precision']:9.4f}  {c['recall']:9.4f}  {c['f1']:9.4f}  {c['support']:9d}")
    total = sum(scores["per_class"][x]["support"] for x in labels)
    lines += ["", f"{'accuracy':<{first}}  {'':9}  {'':9}  {scores['accuracy']:9.4f}  {total:9d}",
              f"{'macro f1':<{first}}  {'':9}  {'':9}  {scores['macro_f1']:9.4f}  {total:9d}",
              f"{'weighted f1':<{first}}  {'':9}  {'':9}  {scores['weighted_f1']:9.4f}  {total:9d}"]
    if scores.get("unlisted"):
        lines.append(f"{scores['unlisted']} predictions named no label in the set")
    return "\n".join(lines)
