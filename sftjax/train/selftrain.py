"""Self-training (the second half of STraTA, Vu et al. 2021) for task.type=classification.

A seeded, class-stratified `selftrain.labelled` fraction of the training records keeps its labels;
the rest is the unlabelled pool, whose labels are hidden from training and read only to report how
accurate the pseudo-labels were. Round 0 trains a teacher on the labelled records. Each later round
predicts the whole pool with the current teacher, keeps the confident predictions (at least
`selftrain.threshold`, at most `selftrain.per_class` per class, most confident first) as labels,
and trains a student from the base model on labelled + pseudo-labelled records; the student is the
next round's teacher. Every round is an ordinary `train.loop.run` of train.steps steps in
WORKDIR/round-K on a JSONL file of its records (WORKDIR/round-K.jsonl), evaluated on the same
held-out records (WORKDIR/heldout.jsonl), so the rounds compare like for like. WORKDIR/selftrain.json
holds every round and the gain of the last student over the teacher.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from sftjax.data import pipeline
from sftjax.data.labels import class_text
from sftjax.data.records import Record
from sftjax.errors import UserError

log = logging.getLogger("sftjax")
SUMMARY = "selftrain.json"
BUCKETS = 3  # length groups the unlabelled pool is predicted in (one per 512 examples, at most)


def draw_labelled(records: Sequence[Record], names: Sequence[str], fraction: float,
                  seed: int) -> tuple[list[Record], list[Record]]:
    """(labelled, unlabelled pool): per class, a seeded random round(fraction * count) of its
    records (at least one) keep their labels, so every class is present and the class mix is the
    data's. Both lists keep the records' original order."""
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for name in names:
        idx = [i for i, r in enumerate(records) if r.label == name]
        if not idx:
            raise UserError(f"selftrain: class {name!r} of data.labels has no training record")
        k = max(1, round(fraction * len(idx)))
        chosen.update(int(i) for i in rng.choice(idx, size=k, replace=False))
    labelled = [r for i, r in enumerate(records) if i in chosen]
    return labelled, [r for i, r in enumerate(records) if i not in chosen]


def select(pred: np.ndarray, conf: np.ndarray, num_classes: int, threshold: float, per_class: int) -> np.ndarray:
    """Indices of the pseudo-labels to keep: confidence >= threshold, then per predicted class the
    most confident, at most `per_class` (0: as many as the smallest class that kept any, so the
    pseudo-labels are class-balanced). Sorted ascending."""
    pred, conf = np.asarray(pred), np.asarray(conf)
    ok = conf >= threshold
    counts = np.bincount(pred[ok], minlength=num_classes)
    cap = per_class or (int(counts[counts > 0].min()) if counts.any() else 0)
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero(ok & (pred == c))
        keep.extend(idx[np.argsort(-conf[idx], kind="stable")][:cap])
    return np.sort(np.asarray(keep, np.int64))


def split_records(cfg) -> tuple[list[Record], list[Record]]:
    """(training, held-out) records of data.train: a recipe's own held-out split, else data.eval,
    else a data.eval_fraction of the source (the same hash split as `pipeline.load`)."""
    d = cfg.data
    if d.mixture:
        raise UserError("data.mixture: selftrain draws labelled records from one source; set data.train")
    src = pipeline.sources(cfg)[0][0]
    recs, held = pipeline.read(src, d)
    recs = list(recs)
    if held is None and d.eval:
        held = list(pipeline.read(d.eval, d)[0])
    elif held is None:
        held = [r for r in recs if pipeline.held_out(r, d.eval_fraction, d.seed)]
        ids = {r.where for r in held}
        recs = [r for r in recs if r.where not in ids]
    if not held:
        raise UserError(f"{src}: no held-out records to compare the rounds on; set data.eval or data.eval_fraction")
    return recs, held[: d.max_eval_examples]


def write_records(path: str, records: Sequence[Record], labels: Sequence[str] | None = None) -> None:
    """Records as classification JSONL lines {"text", "label"} (`labels` replaces theirs: pseudo-labels)."""
    labels = [r.label for r in records] if labels is None else labels
    with open(path, "w", encoding="utf-8") as f:
        for rec, label in zip(records, labels, strict=True):
            f.write(json.dumps({"text": class_text(rec), "label": label}, ensure_ascii=False) + "\n")


def round_config(cfg, train_path: str, heldout_path: str):
    """cfg training on `train_path` and evaluating on `heldout_path` (whole files, no split)."""
    from ml_collections import ConfigDict

    c = ConfigDict(cfg.to_dict())
    c.data.train, c.data.eval, c.data.eval_fraction = train_path, heldout_path, 0.0
    c.data.format = "classification"
    c.lock()
    return c


def pseudo_label(rcfg, workdir: str, pool: Sequence[Record]):
    """(records, predicted class ids, confidences) of the pool under `workdir`'s trained model;
    records the data path drops (data.truncation=drop) are left out."""
    from sftjax.build import build
    from sftjax.data.tokens import encode_records
    from sftjax.train.checkpoint import trainable_at
    from sftjax.train.predict import predict
    from sftjax.train.step import make_predict_step

    setup = build(rcfg)
    _, trainable = trainable_at(workdir, setup, rcfg, "latest")
    store, _ = encode_records(pool, setup.tokenizer, rcfg.data, "unlabelled pool", setup.head)
    kept = set(store.wheres)
    pool = [r for r in pool if r.where in kept]
    examples = pipeline.padded(store, rcfg.data.max_length + 1, setup.tokenizer.pad_token_id)
    step = make_predict_step(setup.model)
    pred, conf = np.zeros(len(pool), np.int64), np.zeros(len(pool))
    # Short texts are the many: predicting in BUCKETS groups of similar length, each padded to its
    # longest, does a fraction of the work of padding all to data.max_length (one compile per group).
    order = np.argsort(store.lengths, kind="stable")
    for rows in np.array_split(order, min(BUCKETS, max(1, len(order) // 512))):
        width = max(int(store.lengths[rows].max()), (examples.head_slots or 0) + 1)
        part = pipeline.Examples(examples.ids[rows, :width], examples.targets[rows, :width],
                                 examples.valid[rows, :width], head_slots=examples.head_slots,
                                 labels=examples.labels[rows, :width])
        p = predict(setup, step, part, trainable, rcfg.train.batch_size)
        pred[rows], conf[rows] = [q[0] for q in p.pred], [c[0] for c in p.conf]
    return pool, pred, conf


def selftrain(cfg, workdir: str) -> dict:
    """Run every round (see the module docstring) and write WORKDIR/selftrain.json; returns it."""
    from sftjax.train.loop import run
    from sftjax.train.workdir import check_writable, write_json

    if cfg.task.type != "classification":
        raise UserError(f"task.type={cfg.task.type}: selftrain pseudo-labels whole texts; it needs "
                        "task.type=classification")
    st, names = cfg.selftrain, tuple(map(str, cfg.data.labels))
    check_writable(workdir, "--workdir")
    records, held = split_records(cfg)
    labelled, pool = draw_labelled(records, names, st.labelled, st.seed)
    if not pool:
        raise UserError(f"selftrain.labelled={st.labelled}: every training record keeps its label, so "
                        "there is nothing to pseudo-label; use a smaller fraction")
    os.makedirs(workdir, exist_ok=True)
    heldout = os.path.join(workdir, "heldout.jsonl")
    write_records(heldout, held)
    log.info("selftrain: %d labelled, %d unlabelled, %d held out, %d rounds of %d steps", len(labelled),
             len(pool), len(held), st.rounds, cfg.train.steps)
    out = {"labelled_fraction": st.labelled, "threshold": st.threshold, "per_class": st.per_class,
           "steps_per_round": cfg.train.steps, "labelled": len(labelled), "unlabelled": len(pool),
           "heldout": len(held), "rounds": []}
    pseudo: list[Record] = []
    pseudo_labels: list[str] = []
    info: dict = {"pseudo_labelled": dict.fromkeys(names, 0), "pseudo_accuracy": None, "pool_accuracy": None}
    for k in range(st.rounds + 1):
        train_path = os.path.join(workdir, f"round-{k}.jsonl")
        write_records(train_path, list(labelled) + pseudo, [r.label for r in labelled] + pseudo_labels)
        rcfg = round_config(cfg, train_path, heldout)
        rdir = os.path.join(workdir, f"round-{k}")
        log.info("selftrain round %d (%s): training on %d labelled + %d pseudo-labelled records", k,
                 "teacher" if k == 0 else "student", len(labelled), len(pseudo))
        res = run(rcfg, rdir)
        ev = res["after"]["eval"]
        row = {"round": k, "labelled": len(labelled), **info,
               "examples": res["data"][train_path]["examples"],
               "heldout_accuracy": ev["accuracy"], "heldout_macro_f1": ev["macro_f1"]}
        out["rounds"].append(row)
        log.info("selftrain round %d: held-out accuracy %.4f, macro F1 %.4f", k, ev["accuracy"], ev["macro_f1"])
        if k == st.rounds:
            break
        kept, pred, conf = pseudo_label(rcfg, rdir, pool)
        idx = select(pred, conf, len(names), st.threshold, st.per_class)
        pseudo = [kept[i] for i in idx]
        pseudo_labels = [names[pred[i]] for i in idx]
        right = sum(r.label == lab for r, lab in zip(pseudo, pseudo_labels, strict=True))
        info = {"pseudo_labelled": {n: pseudo_labels.count(n) for n in names},
                "pseudo_accuracy": right / len(pseudo) if pseudo else None,
                "pool_accuracy": float(np.mean([r.label == names[q] for r, q in zip(kept, pred, strict=True)]))}
        log.info("selftrain: teacher of round %d pseudo-labels %s (accuracy %s against the hidden labels; "
                 "%.4f over the whole pool)", k + 1, info["pseudo_labelled"],
                 "n/a" if not pseudo else f"{info['pseudo_accuracy']:.4f}", info["pool_accuracy"])
        if not pseudo:
            log.warning("selftrain: no prediction reached selftrain.threshold=%s; the student trains on the "
                        "labelled records only", st.threshold)
        write_json(os.path.join(workdir, SUMMARY), out)
    first, last = out["rounds"][0], out["rounds"][-1]
    out["gain"] = {"accuracy": last["heldout_accuracy"] - first["heldout_accuracy"],
                   "macro_f1": last["heldout_macro_f1"] - first["heldout_macro_f1"]}
    write_json(os.path.join(workdir, SUMMARY), out)
    log.info("selftrain: teacher accuracy %.4f macro F1 %.4f -> round %d accuracy %.4f macro F1 %.4f; wrote %s",
             first["heldout_accuracy"], first["heldout_macro_f1"], st.rounds, last["heldout_accuracy"],
             last["heldout_macro_f1"], os.path.join(workdir, SUMMARY))
    return out
