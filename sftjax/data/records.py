"""Read records from a data source: rows from `sources`, each turned into a `Record` by `formats`.

Each record keeps where it came from (`file:line` or `file#row`) so any problem found later, here
or while templating, can name the exact place to fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sftjax.errors import UserError


@dataclass(frozen=True)
class Record:
    """One training example, normalised. Chat-like formats fill `messages`; plain text fills `text`
    (every token is a target). Classification and token-classification records are rendered as
    chat (the reply is the label / the tagged entities) and also keep their raw fields so task
    heads can use them."""

    where: str  # "file:line", "file#row" or "recipe:NAME#index": what an error message names
    messages: tuple[dict, ...] = ()
    text: str | None = None
    label: str | None = None
    tokens: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None


def read_records(path: str, fmt: str = "auto", labels: tuple = (), instruction: str = "") -> Iterator[Record]:
    """Stream the records of a data source, one row at a time.

    Args:
        path: a data file, a `datasets` folder or `hf:LOADER:FILE` (see `sources.iter_rows`).
        fmt: `data.format`: a name in `formats.FORMATS`; "auto" picks each row's format from its keys.
        labels: `data.labels`: allowed class labels or entity types; empty allows any.
        instruction: `data.instruction`: system prompt for classification and token records.

    Raises:
        UserError: the source or a row is bad (the message names `path:line` or `path#row`), or
            the source holds no rows.
    """
    # formats builds Records, so it imports this module; importing it here keeps that one-way.
    from sftjax.data.formats import to_record
    from sftjax.data.sources import iter_rows

    rows = iter_rows(path)
    empty = True
    for where, obj in rows:
        empty = False
        yield to_record(obj, fmt, where, labels, instruction)
    if empty:
        raise UserError(f"{path}: no records (the file is empty)")
