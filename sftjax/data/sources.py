"""Rows of a data source, as `(where, dict)` pairs, streamed from any supported file type.

A source only knows how rows are stored, not what they mean (that is `formats`), so one record
shape can come from JSONL, CSV, Parquet or a `datasets` folder alike. Every row carries `where`,
the place a person would look to fix it: `file:line` for line-based text files, `file#row`
(0-based) for files read as a whole or by row. Large files are never read into memory at once:
text files go line by line, Parquet by record batch, `datasets` folders are memory-mapped.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator

from sftjax.errors import UserError

Row = tuple[str, dict]
CONLL_SUFFIXES = (".conll", ".bio", ".iob")
HF_LOADERS = ("json", "csv", "parquet", "arrow", "text")  # local-file builders; any other name means the hub
SUPPORTED = (".jsonl, .json, .csv, .tsv, .parquet, .conll/.bio/.iob, a folder written by datasets' "
             "save_to_disk, or hf:LOADER:FILE")
BATCH_ROWS = 1024  # rows decoded at once from Parquet and Arrow


def iter_rows(path: str) -> Iterator[Row]:
    """Every row of the source at `path`, in order.

    Args:
        path: a file (its suffix picks the reader), a folder written by `datasets`'
            `save_to_disk`, or `hf:LOADER:FILE` to read a local file with `datasets.load_dataset`.

    Raises:
        UserError: the source is missing, of an unknown type, or unreadable; the message starts
            with the place (`path`, `path:line` or `path#row`).
    """
    if path.startswith("hf:"):
        return read_hf(path)
    if os.path.isdir(path):
        return read_saved_dataset(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: data file not found")
    suffix = os.path.splitext(path)[1].lower()
    readers = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".tsv": read_csv,
               ".parquet": read_parquet} | dict.fromkeys(CONLL_SUFFIXES, read_conll)
    if suffix not in readers:
        raise UserError(f"{path}: unsupported data file type {suffix or '(no suffix)'!r}; supported: {SUPPORTED}")
    return readers[suffix](path)


def text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, decoded one at a time so bad bytes name their line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
            yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line


def read_jsonl(path: str) -> Iterator[Row]:
    """One JSON value per line; blank lines are skipped."""
    for lineno, line in text_lines(path):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                cut = "" if line.endswith("\n") else "; the file ends inside this line: is it truncated?"
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}){cut}") from None


def read_json(path: str) -> Iterator[Row]:
    """A JSON document whose top level is a list of rows (one document, so it is read whole)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno, line_start = data.count(b"\n", 0, e.start) + 1, data.rfind(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start - line_start}); "
                        "re-encode the file as UTF-8") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; one object per line is JSON Lines: name the file .jsonl" if e.msg == "Extra data" else ""
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}){hint}") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of records at the top level, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        yield f"{path}#{i}", row


def read_csv(path: str) -> Iterator[Row]:
    """Comma- (`.csv`) or tab-separated (`.tsv`) rows keyed by the header row's column names.

    A quoted cell may span lines; the row is named by its first line.
    """
    lines = (line for _, line in text_lines(path))
    reader = csv.reader(lines, delimiter="\t" if path.lower().endswith(".tsv") else ",")
    try:
        header = next(reader, None)
        start = reader.line_num + 1  # line_num: lines consumed so far, so the next row's first line
        for cells in reader:
            where, start = f"{path}:{start}", reader.line_num + 1
            if not cells:
                continue
            if len(cells) != len(header):
                raise UserError(f"{where}: {len(cells)} columns but the header has {len(header)} "
                                f"({', '.join(header)})")
            yield where, dict(zip(header, cells, strict=True))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def read_parquet(path: str) -> Iterator[Row]:
    """Rows of a Parquet file, one record batch in memory at a time."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        row = 0
        for batch in file.iter_batches(batch_size=BATCH_ROWS):
            for obj in batch.to_pylist():
                yield f"{path}#{row}", obj
                row += 1
    except pyarrow.ArrowException as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None


def read_saved_dataset(path: str) -> Iterator[Row]:
    """Rows of a folder written by `Dataset.save_to_disk` (a `DatasetDict` folder: its train split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise UserError(f"{path}: a folder, but not one written by datasets' save_to_disk "
                        f"(supported sources: {SUPPORTED})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                            "give the folder of one split")
        ds = ds["train"]
    return _dataset_rows(ds, path)


def read_hf(spec: str) -> Iterator[Row]:
    """`hf:LOADER:FILE`: a local file read by one of `datasets`' packaged loaders."""
    loader, _, data_file = spec.removeprefix("hf:").partition(":")
    if loader not in HF_LOADERS or not data_file:
        raise UserError(f"{spec}: expected hf:LOADER:FILE with LOADER one of {', '.join(HF_LOADERS)} "
                        "(only local files are read)")
    if not os.path.exists(data_file):
        raise UserError(f"{spec}: data file not found ({data_file})")
    import datasets

    ds = datasets.load_dataset(loader, data_files=data_file, split="train")
    return _dataset_rows(ds, spec)


def _dataset_rows(ds, name: str) -> Iterator[Row]:
    """Rows of a `datasets.Dataset`, with class-label ids turned back into their names, so tags
    and labels read the same from a `datasets` folder as from a JSON file."""
    import datasets

    names = {}
    for col, feature in ds.features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, datasets.ClassLabel):
            names[col] = (feature.int2str, False)
        elif isinstance(inner, datasets.ClassLabel):
            names[col] = (inner.int2str, True)
    row = 0
    for batch in ds.iter(batch_size=BATCH_ROWS):
        for values in zip(*batch.values(), strict=True):
            obj = dict(zip(batch, values, strict=True))
            for col, (to_name, is_list) in names.items():
                if obj[col] is not None:
                    obj[col] = [to_name(v) for v in obj[col]] if is_list else to_name(obj[col])
            yield f"{name}#{row}", obj
            row += 1


def read_conll(path: str) -> Iterator[Row]:
    """CoNLL-style columns: `token ... TAG` per line, a blank line between sentences.

    The token is the first column and the tag the last (CoNLL-2003 files carry POS and chunk
    columns between them); `-DOCSTART-` lines mark documents and are skipped. Each sentence is
    one row `{"tokens": [...], "tags": [...]}`, named by its first line.
    """
    tokens, tags, first = [], [], 0
    for lineno, line in text_lines(path):
        cols = line.split()
        if cols and cols[0] == "-DOCSTART-":
            cols = []
        if not cols:
            if tokens:
                yield f"{path}:{first}", {"tokens": tokens, "tags": tags}
            tokens, tags = [], []
            continue
        if len(cols) < 2:
            raise UserError(f"{path}:{lineno}: no tag column in {line.strip()!r} "
                            "(expected 'TOKEN TAG', columns separated by spaces or tabs)")
        if not tokens:
            first = lineno
        tokens.append(cols[0])
        tags.append(cols[-1])
    if tokens:
        yield f"{path}:{first}", {"tokens": tokens, "tags": tags}
