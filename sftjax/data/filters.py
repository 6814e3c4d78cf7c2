"""Quality and duplicate filters over records, each removal counted and logged by reason.

Bad examples cost more than they look: an empty reply teaches the model to stop at once, a runaway
loop teaches it to loop, and a record seen ten times is learnt ten times as hard. The filters run
in a fixed order (quality filters in the order given, then exact, then near deduplication), a
record is counted under the first reason that removes it, and the first occurrence of any
duplicate is the one kept, so the surviving data keeps its original order and the counts add up
to exactly the records removed.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
import zlib
from collections.abc import Callable

from datasketch import MinHash, MinHashLSH

from sftjax.data.records import Record

log = logging.getLogger("sftjax")

# Repetition rule (see `is_repetitive`). Normal prose and code stay far below these: the sftjax
# README and sources have at most ~14% repeated word 3-grams, and their longest single-character
# runs are indentation (up to ~52 spaces); a model caught in a loop is at 50% within a few cycles.
REPEAT_MIN_WORDS = 20
REPEAT_MAX_DUP_FRACTION = 0.5
_RUN_ANY = re.compile(r"(.)\1{49}", re.DOTALL)  # a cheap first scan: any character 50 times in a row
_RUN_ALNUM = re.compile(r"([^\W_])\1{49}")  # one letter or digit 50+ times: "aaaa…", "0000…"
_RUN_OTHER = re.compile(r"(.)\1{199}", re.DOTALL)  # anything 200+ times: rules and indentation are shorter

NUM_PERM = 128
SHINGLE_WORDS = 5

REASONS = {  # reason -> how a log line describes records removed for it
    "empty_reply": "with only empty replies (or empty text)",
    "repetition": "with runaway repetition",
    "exact_duplicate": "repeating an earlier record (ignoring case, spacing and Unicode form)",
    "near_duplicate": "nearly repeating an earlier record",
}


def assistant_texts(record: Record) -> list[str]:
    """What the model is trained to write: the assistant replies, or the whole plain text."""
    if record.text is not None:
        return [record.text]
    return [m["content"] for m in record.messages if m["role"] == "assistant"]


def is_empty(record: Record) -> bool:
    """True when every reply (or the text) is empty or whitespace: nothing worth learning."""
    return not any(t.strip() for t in assistant_texts(record))


def is_repetitive(text: str) -> bool:
    """True for runaway repetition: a degenerate loop no training example should teach.

    The rule: a text of at least `REPEAT_MIN_WORDS` words of which more than half of the word
    3-grams (case-folded) repeat an earlier 3-gram, or a single letter or digit repeated 50 times
    in a row, or any other character (punctuation, spaces, newlines) repeated 200 times in a row.
    Separator lines and code indentation are why the second threshold is higher.
    """
    words = text.casefold().split()
    if len(words) >= REPEAT_MIN_WORDS:
        grams = list(zip(words, words[1:], words[2:], strict=False))
        if 1 - len(set(grams)) / len(grams) > REPEAT_MAX_DUP_FRACTION:
            return True
    return bool(_RUN_ANY.search(text) and (_RUN_ALNUM.search(text) or _RUN_OTHER.search(text)))


QUALITY: dict[str, tuple[str, Callable[[Record], bool]]] = {  # filter name -> (reason, removes?)
    "empty": ("empty_reply", is_empty),
    "repetition": ("repetition", lambda r: any(is_repetitive(t) for t in assistant_texts(r))),
}


def normalise(record: Record) -> str:
    """The record's whole content as one string that ignores case, Unicode form and spacing."""
    if record.text is not None:
        raw = record.text
    else:
        raw = "\n".join(f"{m['role']}: {m['content']}" for m in record.messages)
    return " ".join(unicodedata.normalize("NFKC", raw).casefold().split())


def shingles(text: str) -> set[bytes]:
    """Word `SHINGLE_WORDS`-grams of a normalised text; a shorter text is one shingle of all its
    words, so short records only match when they are equal."""
    words = text.encode().split()
    n = min(SHINGLE_WORDS, len(words))
    return set(map(b" ".join, zip(*(words[i:] for i in range(n)), strict=False)))


class RecordFilter:
    """The filters as a streaming check: `reason(record)` says why to drop it, or None to keep.

    State is only what deduplication needs (a 16-byte digest per kept record, and MinHash
    sketches of kept records for near dedup), so a large source can be filtered while it is read.
    """

    def __init__(self, dedup: str, threshold: float, quality: tuple[str, ...], name: str):
        self.dedup, self.threshold, self.name = dedup, threshold, name
        self.quality = [QUALITY[q] for q in dict.fromkeys(quality)]
        # reason -> records removed for it (zeros shown: the filter ran), and the first few `where`s
        reasons = [r for r, _ in self.quality] + ["exact_duplicate"] * (dedup != "none") + ["near_duplicate"] * (dedup == "near")
        self.removed: dict[str, int] = dict.fromkeys(reasons, 0)
        self.examples: dict[str, list[str]] = {r: [] for r in reasons}
        if dedup != "none":
            self._seen: set[bytes] = set()
        if dedup == "near":
            self._lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
            self._sketches: dict[int, MinHash] = {}

    def reason(self, record: Record) -> str | None:
        """Why `record` goes (counted), or None when it stays (and is remembered for dedup)."""
        why = self._check(record)
        if why is not None:
            self.removed[why] += 1
            if len(self.examples[why]) < 3:
                self.examples[why].append(record.where)
        return why

    def _check(self, record: Record) -> str | None:
        for reason, bad in self.quality:
            if bad(record):
                return reason
        if self.dedup == "none":
            return None
        key = normalise(record)
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        if digest in self._seen:
            return "exact_duplicate"
        if self.dedup == "near":
            mh = MinHash(num_perm=NUM_PERM, hashfunc=zlib.crc32)
            mh.update_batch(shingles(key))
            if any(self._sketches[j].jaccard(mh) >= self.threshold for j in self._lsh.query(mh)):
                return "near_duplicate"
            i = len(self._sketches)
            self._lsh.insert(i, mh)
            self._sketches[i] = mh
        self._seen.add(digest)
        return None

    def counts(self) -> dict[str, int]:
        return dict(self.removed)

    def log(self) -> None:
        """One line per reason, naming the first few records so a user can look at what went."""
        for reason, n in self.removed.items():
            if not n:
                continue
            what = REASONS[reason] + (f" (Jaccard >= {self.threshold})" if reason == "near_duplicate" else "")
            more = f", ... ({n - 3} more)" if n > 3 else ""
            log.info("%s: removed %d record%s %s: %s%s", self.name, n, "" if n == 1 else "s", what,
                     ", ".join(self.examples[reason]), more)


def apply_filters(records: list[Record], dedup: str, threshold: float, quality: tuple[str, ...],
                  name: str) -> tuple[list[Record], dict[str, int]]:
    """Drop low-quality and duplicate records.

    Args:
        records: in their original order.
        dedup: "none", "exact" or "near" (near also removes exact duplicates first).
        threshold: estimated Jaccard similarity of word 5-gram shingles at or above which two
            records are near duplicates (`data.near_dup_threshold`). A one-word edit changes 5
            shingles, so at 0.85 it is caught in records of about 65 words or more; shorter
            records must be closer to count.
        quality: names of quality filters to run (`data.quality`): "empty", "repetition".
        name: what the log lines call this data, e.g. "train data".

    Returns:
        The kept records in their original order, and the number removed for each reason that
        was checked (zeros included, so a report can show that a filter ran).
    """
    f = RecordFilter(dedup, threshold, quality, name)
    kept = [r for r in records if f.reason(r) is None]
    f.log()
    return kept, f.counts()
