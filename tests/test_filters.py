"""Quality and duplicate filters: exact counts per reason, order kept, thresholds on real text."""

import logging
import random
from pathlib import Path

import pytest

from sftjax.data.filters import apply_filters, is_repetitive
from sftjax.data.records import Record
from sftjax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

PROSE = """\
A fine-tuning run starts from a model that already writes fluent text and nudges it towards the
replies in your data. The data therefore matters more than almost any setting: a few hundred clean,
varied examples teach more than thousands of near copies of the same answer.

Before training, every record is read, checked and normalised to a list of chat messages. Records
that cannot be read are reported with the file and line to fix, so a broken line never disappears
silently. The chat template then turns each conversation into text, and the loss is computed only
on the tokens the assistant is meant to write.

When the run ends, the adapter weights are merged into the base model and written to a folder that
the usual libraries load. Evaluate on held-out questions before and after training: if the loss
falls but the replies get worse, the data is teaching the wrong thing, and no learning rate will
fix that.
"""

LONG = " ".join(PROSE.split())  # 161 words: a one-word edit changes 5 of ~160 shingles (Jaccard ~0.94)


def chat(where, reply, question="What is the capital of France?", **kw):
    return Record(where, ({"role": "user", "content": question}, {"role": "assistant", "content": reply}), **kw)


def run(records, dedup="exact", quality=("empty", "repetition"), threshold=0.85):
    return apply_filters(records, dedup, threshold, quality, "train data")


def test_counts_per_reason_and_order_kept(caplog):
    records = [
        chat("f:1", "Paris."),
        chat("f:2", "   \n"),  # empty reply
        Record("f:3", ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
                       {"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hello!"})),
        Record("f:4", text=" \t"),  # empty text
        chat("f:5", "I am sorry. " * 20),  # loop
        chat("f:6", "ＰＡＲＩＳ. ", question="what  is the Capital of France?"),  # f:1 after NFKC/case/space
        Record("f:7", text="Plain text to continue."),
        Record("f:8", text="plain TEXT to continue."),  # f:7
        chat("f:9", LONG, question="Tell me a story."),
        chat("f:10", LONG.replace("normalised", "converted"), question="Tell me a story."),  # near f:9
        chat("f:11", "   "),  # empty and a duplicate of f:2: counted once, as empty
    ]
    caplog.set_level(logging.INFO, logger="sftjax")
    kept, counts = run(records, dedup="near")
    assert [r.where for r in kept] == ["f:1", "f:3", "f:7", "f:9"]
    assert counts == {"empty_reply": 3, "repetition": 1, "exact_duplicate": 2, "near_duplicate": 1}
    assert len(kept) + sum(counts.values()) == len(records)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all(line.startswith("train data: removed ") for line in lines)
    assert "removed 3 records with only empty replies (or empty text): f:2, f:4, f:11" in lines[0]
    assert "f:10" in lines[3] and "Jaccard >= 0.85" in lines[3]


def test_modes_and_filters_can_be_switched_off():
    records = [chat("a", "Paris."), chat("b", "Paris."), chat("c", ""), chat("d", "Paris!")]
    assert run(records, dedup="none", quality=()) == (records, {})
    kept, counts = run(records, dedup="exact", quality=())
    assert [r.where for r in kept] == ["a", "c", "d"] and counts == {"exact_duplicate": 1}
    kept, counts = run(records, dedup="none", quality=("empty",))
    assert [r.where for r in kept] == ["a", "b", "d"] and counts == {"empty_reply": 1}


def test_near_dedup_catches_a_one_word_edit_but_keeps_distinct_short_records():
    long = [chat("a", LONG), chat("b", LONG.replace("checked", "validated")), chat("c", LONG[: len(LONG) // 2])]
    short = [chat(f"s{i}", reply, question="Is it raining?") for i, reply in enumerate(["Yes.", "No.", "Maybe."])]
    short += [chat("q1", "Yes.", question="Is it snowing?"), Record("t1", text="Hello there"), Record("t2", text="Hi")]
    kept, counts = run(long + short, dedup="near")
    assert [r.where for r in kept] == ["a", "c", "s0", "s1", "s2", "q1", "t1", "t2"]
    assert counts["near_duplicate"] == 1 and counts["exact_duplicate"] == 0


def test_near_dedup_keeps_the_first_of_each_cluster_in_order():
    rng = random.Random(0)
    vocab = [f"word{i}" for i in range(2000)]
    originals = [Record(f"r{i}", text=" ".join(rng.choices(vocab, k=200))) for i in range(30)]
    records = []
    for i, r in enumerate(originals):
        records.append(r)
        if i % 5 == 4:  # a one-word edit of an earlier record, then an edit of that edit
            words = originals[i - 3].text.split()
            words[50] = "edited"
            records.append(Record(f"d{i}", text=" ".join(words)))
            words[150] = "again"
            records.append(Record(f"e{i}", text=" ".join(words)))
    kept, counts = run(records, dedup="near")
    assert kept == originals
    assert counts == {"exact_duplicate": 0, "near_duplicate": 12, "empty_reply": 0, "repetition": 0}


def test_unknown_filter_names_the_key_and_the_known_filters():
    from sftjax.config import base_config, validate

    cfg = base_config()
    cfg.data.quality = ("empty", "lenght")
    with pytest.raises(UserError, match=r"data\.quality: unknown filter 'lenght'.*empty, repetition"):
        validate(cfg)
    cfg.data.quality, cfg.data.dedup = ("empty",), "fuzzy"
    with pytest.raises(UserError, match=r"data\.dedup: 'fuzzy' is not one of none, exact, near"):
        validate(cfg)


def test_repetition_never_fires_on_normal_text():
    paragraphs = PROSE.split("\n\n")
    assert not any(is_repetitive(p) for p in paragraphs)
    assert not is_repetitive(PROSE)
    # This project's own prose and code, whole and by paragraph: lists, tables, separator lines
    # and deep indentation included.
    files = [ROOT / "README.md", *sorted((ROOT / "sftjax").rglob("*.py"))]
    for f in files:
        text = f.read_text()
        assert not is_repetitive(text), f
        assert not any(is_repetitive(p) for p in text.split("\n\n")), f
    assert not is_repetitive("# " + "=" * 98 + "\n" + " " * 60 + "x = 1\n" + "|---" * 12 + "|")
    assert not is_repetitive("Step 1: add the flour. Step 2: add the sugar. Step 3: add the eggs. "
                             "Step 4: stir well. Step 5: bake for twenty minutes. Step 6: let it cool.")
    assert not is_repetitive("ha " * 19)  # too short to judge by 3-grams


@pytest.mark.parametrize("text", [
    "I am sorry, I cannot help with that. " * 6,
    "the " * 20,
    PROSE + " Let me know if you need anything else." * 40,
    "Sure" + "!" * 10 + "a" * 50,
    "ok" + "0" * 50,
    "Done." + "!" * 200,
    "Here:" + "\n" * 200,
])
def test_repetition_fires_on_degenerate_loops(text):
    assert is_repetitive(text)
    kept, counts = run([chat("x", "Fine."), chat("y", text)], dedup="none", quality=("repetition",))
    assert [r.where for r in kept] == ["x"] and counts == {"repetition": 1}
