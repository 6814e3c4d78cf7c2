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
from collections.abc import Callable, Iterator

from datasketch import MinHash, MinHashLSH

from sftjax.data.records import Record
from sftjax.errors import UserError

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
    unknown = [q for q in quality if q not in QUALITY]
    if unknown:
        raise UserError(f"data.quality: unknown filter {', '.join(map(repr, unknown))}; "
                        f"known filters: {', '.join(QUALITY)}")
    if dedup not in ("none", "exact", "near"):
        raise UserError(f"data.dedup: {dedup!r} is not one of none, exact, near")
    removed: dict[str, list[str]] = {}  # reason -> `where` of each record removed for it, in order
    kept = list(records)
    for q in dict.fromkeys(quality):
        reason, bad = QUALITY[q]
        kept = _split(kept, [bad(r) for r in kept], removed.setdefault(reason, []))
    if dedup != "none":
        keys = [normalise(r) for r in kept]
        dup = list(_exact_duplicates(keys))
        kept, keys = _split(kept, dup, removed.setdefault("exact_duplicate", [])), _keep(keys, dup)
    if dedup == "near":
        dup = list(_near_duplicates(keys, threshold))
        kept = _split(kept, dup, removed.setdefault("near_duplicate", []))
    _log(name, removed, threshold)
    return kept, {reason: len(where) for reason, where in removed.items()}


def _log(name: str, removed: dict[str, list[str]], threshold: float) -> None:
    """One line per reason, naming the first few records so a user can look at what went."""
    for reason, where in removed.items():
        if not where:
            continue
        what = REASONS[reason] + (f" (Jaccard >= {threshold})" if reason == "near_duplicate" else "")
        more = f", ... ({len(where) - 3} more)" if len(where) > 3 else ""
        log.info("%s: removed %d record%s %s: %s%s", name, len(where), "" if len(where) == 1 else "s", what,
                 ", ".join(where[:3]), more)


def _split(records: list[Record], drop: list[bool], removed: list[str]) -> list[Record]:
    removed.extend(r.where for r, d in zip(records, drop, strict=True) if d)
    return _keep(records, drop)


def _keep(items: list, drop: list[bool]) -> list:
    return [x for x, d in zip(items, drop, strict=True) if not d]


def _exact_duplicates(keys: list[str]) -> Iterator[bool]:
    seen: set[bytes] = set()
    for key in keys:
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        yield digest in seen
        seen.add(digest)


def _near_duplicates(keys: list[str], threshold: float) -> Iterator[bool]:
    """Flags each text whose MinHash is within `threshold` of an earlier kept one.

    LSH only proposes candidates; each is confirmed by the MinHash Jaccard estimate, so a false
    LSH collision never removes a record. Shingles are hashed with CRC-32 (fast, and unlike
    Python's `hash` the same in every process, so every host drops the same records). Only kept
    texts are indexed: each cluster keeps its first member, and in a chain A~B~C, C is kept when
    it is not itself close to A.
    """
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    kept: dict[int, MinHash] = {}
    sketches = MinHash.generator((shingles(k) for k in keys), num_perm=NUM_PERM, hashfunc=zlib.crc32)
    for i, mh in enumerate(sketches):
        dup = any(kept[j].jaccard(mh) >= threshold for j in lsh.query(mh))
        if not dup:
            lsh.insert(i, mh)
            kept[i] = mh
        yield dup
