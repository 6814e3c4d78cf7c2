"""Sampled decoding (temperature, top-k, top-p, seed, stop strings) and `sftjax generate --prompts`."""

import json

import numpy as np
import pytest

from sftjax.errors import UserError
from sftjax.infer.generate import generator, greedy, sample
from sftjax.infer.sample import Sampling, cut_at_stop

PROMPTS = [np.arange(5, 12, dtype=np.int32), np.arange(300, 303, dtype=np.int32)]


def _tokens(outs):
    return [o.tolist() for o in outs]


def test_limits_of_sampling_equal_greedy_and_compile_nothing(tiny_config):
    """Temperature near 0, top_k=1 and a tiny top_p all leave one candidate: the greedy token.
    The settings are traced, so none of these calls compiles anything after the first."""
    from sftjax.build import build

    setup = build(tiny_config)
    params, gen = setup.full_params(), generator(setup.model)
    want = _tokens(greedy(setup.model, params, PROMPTS, 8, eos_id=None))
    traced = gen.traces
    for s in (Sampling(temperature=1e-6, seed=1), Sampling(temperature=1.0, top_k=1, seed=2),
              Sampling(temperature=1.5, top_p=1e-6, seed=3)):
        assert _tokens(sample(setup.model, params, PROMPTS, 8, None, s)) == want, s
    sample(setup.model, params, PROMPTS, 8, None, Sampling(temperature=0.7, top_k=50, top_p=0.9))
    assert gen.traces == traced  # other temperatures, top-k, top-p and seeds: nothing traced


def test_seed_reproduces_and_different_seeds_differ(tiny_config):
    from sftjax.build import build

    setup = build(tiny_config)
    params = setup.full_params()

    def run(seed):
        return _tokens(sample(setup.model, params, PROMPTS, 16, None, Sampling(temperature=1.0, seed=seed)))

    first = run(0)
    assert run(0) == first
    assert run(1) != first  # 32 draws from a near-uniform 49152-way distribution: never all equal
    assert first != _tokens(greedy(setup.model, params, PROMPTS, 16, eos_id=None))


def test_stop_string_cuts_the_text_and_ends_the_row(tiny_config):
    from sftjax.build import build
    from sftjax.infer.generate import chat

    setup = build(tiny_config)
    params, tok = setup.full_params(), setup.tokenizer
    # A row stops as soon as `done` says so; the others go on.
    outs = generator(setup.model).generate(params, PROMPTS, 12, None, done=lambda row, ids: row == 0 and len(ids) == 3)
    assert [len(o) for o in outs] == [3, 12]
    # chat(): the reply ends before the first stop string (a word from the middle of the free reply).
    conv = [{"role": "user", "content": "Hello there"}]
    full = chat(setup.model, params, tok, [conv], 12)[0]
    words = full.split()
    assert len(words) > 2, full
    stop = words[len(words) // 2]
    cut = chat(setup.model, params, tok, [conv], 12, Sampling(stop=(stop, "\x00never")))[0]
    assert cut == full[: full.find(stop)].strip() and len(cut) < len(full)


def test_cut_at_stop_and_bad_settings():
    assert cut_at_stop("abc STOP def END", ("END", "STOP")) == ("abc ", True)
    assert cut_at_stop("abc", ("x",)) == ("abc", False)
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5), dict(stop=("",))):
        with pytest.raises(UserError):
            Sampling(**bad)


def test_generate_prompts_file_writes_each_line_plus_output(tiny_config, tmp_path, capsys):
    from sftjax.cli import main
    from sftjax.train.loop import run

    wd = str(tmp_path / "run")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": 1, "prompt": "Hi"}) + "\n\n"
                       + json.dumps({"id": 2, "messages": [{"role": "user", "content": "Name a colour."}]}) + "\n")
    out = tmp_path / "out.jsonl"
    # Flag mistakes fail before the (here missing) workdir loads.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    assert main(["generate", f"--workdir={wd}", f"--prompts={bad}"]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"text": "neither field"}) + "\n")
    assert main(["generate", f"--workdir={wd}", f"--prompts={bad}"]) == 2
    assert f"{bad}:1:" in capsys.readouterr().err
    assert main(["generate", f"--workdir={wd}", f"--prompts={tmp_path / 'missing.jsonl'}"]) == 2
    assert "--prompts: cannot read" in capsys.readouterr().err
    assert main(["generate", f"--workdir={wd}", f"--prompts={prompts}", f"--output={tmp_path / 'no' / 'o.jsonl'}"]) == 2
    assert "--output: folder" in capsys.readouterr().err
    assert main(["generate", f"--workdir={wd}", "--prompt=Hi", "--top-p=0"]) == 2
    assert "top_p" in capsys.readouterr().err

    run(tiny_config, wd)
    assert main(["generate", f"--workdir={wd}", f"--prompts={prompts}", f"--output={out}", "--max-new-tokens=6",
                 "--batch-size=4", "--temperature=0.8", "--top-k=40", "--seed=3", "--stop=\n\n"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2] and all(isinstance(r["output"], str) for r in rows)
    assert rows[1]["messages"][0]["content"] == "Name a colour."
    # `sftjax eval` on the same run: greedy replies to held-out conversations scored against their
    # references (ROUGE-L, BLEU), and general data's perplexity under the base and the tuned model.
    from sftjax.scores.text import text_scores

    chat = tiny_config.data.train
    assert main(["eval", f"--workdir={wd}", "--generate=3", "--max-new-tokens=4", f"--forgetting={chat}"]) == 0
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    g, f = ev["generation"], ev["forgetting"]
    assert 1 <= g["examples"] <= 3 and len(g["samples"]) == g["examples"]
    again = text_scores([x["output"] for x in g["samples"]], [x["reference"] for x in g["samples"]])
    assert (again["rouge_l"], again["bleu"]) == (g["rouge_l"], g["bleu"])
    assert f["source"] == chat and f["base_perplexity"] != f["tuned_perplexity"]
    assert "ROUGE-L" in capsys.readouterr().out


def test_chat_keeps_the_history_until_exit(tiny_config):
    from sftjax.build import build
    from sftjax.infer.converse import converse

    setup = build(tiny_config)
    said = []
    history = converse(setup.model, setup.full_params(), setup.tokenizer, ["Hi\n", "\n", "And then?\n", "/exit\n",
                                                                          "never read\n"],
                       4, Sampling(), system="Be brief.", say=said.append)
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in history[2::2]] == said
