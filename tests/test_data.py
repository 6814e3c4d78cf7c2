import json

import numpy as np
import pytest
from helpers import read_list

from sftjax.data.chat import encode
from sftjax.data.records import Record
from sftjax.errors import UserError


def test_mask_covers_exactly_every_assistant_turn(smol_tokenizer):
    rec = Record("t:1", (
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name two rivers in Europe."},
        {"role": "assistant", "content": "The Danube and the Rhine."},
        {"role": "user", "content": "And one in Africa?"},
        {"role": "assistant", "content": "The Nile."},
    ))
    ids, mask = encode(smol_tokenizer, rec)
    # Each contiguous masked run decodes to exactly one assistant reply plus its end-of-turn token.
    runs, cur = [], []
    for i in range(len(ids)):
        if mask[i]:
            cur.append(ids[i])
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [smol_tokenizer.decode(r) for r in runs] == ["The Danube and the Rhine.<|im_end|>", "The Nile.<|im_end|>"]
    # Nothing from the system/user turns or the role headers is trained on.
    unmasked = smol_tokenizer.decode(ids[~mask])
    assert "Danube" not in unmasked and "Nile" not in unmasked and "Name two rivers" in unmasked
    assert "<|im_start|>assistant\n" in unmasked


def test_alpaca_and_messages_records(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"}) + "\n\n"
                 + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    recs = read_list(str(p))
    assert recs[0].messages == ({"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"})
    assert recs[0].where == f"{p}:1" and recs[1].where == f"{p}:3"


@pytest.mark.parametrize("line, expected", [
    ('{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
    ('{"instruction": "do it"}', "field 'output' is missing"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"question": "x"}', "cannot tell the record format"),
    ('{"instruction": " ", "output": "x"}', "field 'instruction' is empty"),
])
def test_bad_line_names_file_and_line(tmp_path, line, expected):
    p = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    p.write_text(good + "\n" + line + "\n")
    with pytest.raises(UserError) as e:
        read_list(str(p))
    assert f"{p}:2" in str(e.value) and expected in str(e.value)


def test_non_utf8_line(tmp_path):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff"}\n')
    with pytest.raises(UserError, match=r"bin.jsonl:2: not valid UTF-8"):
        read_list(str(p))


def test_batches_shift_targets_and_gather_target_slots(smol_tokenizer):
    from helpers import tokenize

    recs = [Record(f"r:{i}", ({"role": "user", "content": f"Question {i}?"},
                              {"role": "assistant", "content": "Yes."})) for i in range(4)]
    from sftjax.config import base_config

    dcfg = base_config().data
    dcfg.max_length = 64
    ex = tokenize(recs, smol_tokenizer, dcfg, "test")
    assert ex.head_slots == 8  # "Yes." + <|im_end|> is 3 targets -> 8 slots
    b = ex.batch(np.arange(4))
    row_ids, row_mask = ex.ids[0], ex.targets[0]
    want = row_ids[np.flatnonzero(row_mask[1:]) + 1]
    got = b["labels"][0][b["weights"][0] > 0]
    assert np.array_equal(got, want)
    # The input at each gathered position is the token right before its label.
    pos = b["head_positions"][0][b["weights"][0] > 0]
    assert np.array_equal(b["input_ids"][0][pos], row_ids[np.flatnonzero(row_mask[1:])])


@pytest.mark.parametrize("template", ["model", "chatml", "llama-3", "alpaca"])
def test_fast_spans_equal_the_definition_on_long_chats(smol_tokenizer, template):
    """The one-render route for long chats gives exactly the spans of the two-renders-per-reply
    definition, on real multi-turn conversations and awkward synthetic ones."""
    import copy

    from sftjax.data.chat import assistant_spans, exact_span, fast_spans
    from sftjax.data.recipes import chitchat
    from sftjax.data.templates import resolve

    tok = copy.deepcopy(smol_tokenizer)
    resolve(tok, template)
    convs = [r for r in chitchat()[0][:40] if len(r.messages) > 6]
    odd = ({"role": "system", "content": "  Be brief.  "},) + tuple(
        {"role": ("user", "assistant")[i % 2], "content": c}
        for i, c in enumerate(["hi", " spaced reply ", "a\n\nb", "Line\n", "<|im_end|> literal", "ok", "x", "y"]))
    convs.append(Record("odd:1", odd))
    fast_used = 0
    for rec in convs:
        text, spans = assistant_spans(tok, rec)
        exact = [exact_span(tok, rec, i, text) for i, m in enumerate(rec.messages) if m["role"] == "assistant"]
        assert spans == exact, rec.where
        fast_used += fast_spans(tok, rec.messages, text) == exact
    assert fast_used >= len(convs) - 1  # the fast route applies to (nearly) all of them
