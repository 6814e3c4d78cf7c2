"""The training data path: token store and mask audit, packing, buckets, mixtures, shards, resume."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from sftjax.config import base_config
from sftjax.data.loader import make_loader
from sftjax.data.records import Record
from sftjax.data.tokens import TokenStore, encode_records
from sftjax.errors import UserError


def _store(n, lo, hi, seed, vocab=1000, tail=None):
    """Random examples; the second half of each is its target (the last `tail` tokens if given)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi, n)
    ids = [rng.integers(3, vocab, k).astype(np.int32) for k in lens]
    tgt = [np.arange(k) >= (k // 2 if tail is None else k - tail) for k in lens]
    return TokenStore(np.concatenate(ids), np.concatenate(tgt), np.concatenate([[0], np.cumsum(lens)]),
                      [f"s{seed}#{i}" for i in range(n)])


def _dcfg(**kw) -> ConfigDict:
    d = base_config().data
    d.max_length = 64
    d.update(kw)
    return d


def _chat(i, replies=("Fine.",)):
    msgs = [{"role": "system", "content": "Be brief."}]
    for r in replies:
        msgs += [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": r}]
    return Record(f"t:{i}", tuple(msgs))


def test_loss_modes_and_mask_audit(smol_tokenizer):
    recs = [_chat(i, ("One.", "Two.")) for i in range(3)]
    runs = {}
    for mode in ("assistant", "last_assistant", "all"):
        store, removed = encode_records(recs, smol_tokenizer, _dcfg(loss_on=mode), "t")
        ids, mask = store.example(0)
        runs[mode] = smol_tokenizer.decode(ids[mask])
        assert removed == {"too_long": 0, "too_short": 0, "no_targets": 0}
    assert runs["assistant"] == "One.<|im_end|>Two.<|im_end|>"
    assert runs["last_assistant"] == "Two.<|im_end|>"
    assert runs["all"] == smol_tokenizer.decode(store.example(0)[0])
    # A template without turn markers makes the mask cover every token: the audit refuses it.
    tok = smol_tokenizer
    old = tok.chat_template
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        only_replies = [Record(f"t:{i}", ({"role": "assistant", "content": f"Reply number {i}."},)) for i in range(3)]
        with pytest.raises(UserError, match="covers every token"):
            encode_records(only_replies, tok, _dcfg(), "t")
    finally:
        tok.chat_template = old


def test_truncation_counts_and_never_silently_loses_targets(smol_tokenizer):
    long_user = Record("t:long", ({"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "Ok."}))
    recs = [long_user] + [_chat(i) for i in range(3)]
    store, removed = encode_records(recs, smol_tokenizer, _dcfg(max_length=32), "t")
    assert removed["no_targets"] == 1 and len(store) == 3  # right truncation cut the reply away: counted
    store, removed = encode_records(recs, smol_tokenizer, _dcfg(max_length=32, truncation="left"), "t")
    assert removed["no_targets"] == 0 and len(store) == 4  # left truncation keeps the reply
    assert smol_tokenizer.decode(store.example(0)[0][store.example(0)[1]]) == "Ok.<|im_end|>"
    store, removed = encode_records(recs, smol_tokenizer, _dcfg(max_length=32, truncation="drop"), "t")
    assert removed["too_long"] == 1 and len(store) == 3
    with pytest.raises(UserError, match="t:long: no target token left"):
        encode_records(recs, smol_tokenizer, _dcfg(max_length=32, on_no_targets="raise"), "t")
    store, removed = encode_records(recs, smol_tokenizer, _dcfg(max_length=128, min_tokens=30), "t")
    assert removed["too_short"] == 3 and len(store) == 1
    with pytest.raises(UserError, match="no usable examples"):
        encode_records(recs[1:], smol_tokenizer, _dcfg(min_tokens=1000), "t")


def test_plain_text_trains_every_token(smol_tokenizer):
    store, _ = encode_records([Record("t:1", text="Plain text for continued pre-training.")], smol_tokenizer,
                              _dcfg(), "t")
    ids, mask = store.example(0)
    assert mask.all() and ids[-1] == smol_tokenizer.eos_token_id


def test_packed_rows_attend_within_segments_only(tiny_model_dir):
    """Each packed example's logits equal the logits of that example run alone (to 1e-5)."""
    import jax

    from sftjax.io.load import load_pretrained
    from sftjax.models.llama import Llama

    cfg, params, _ = load_pretrained(tiny_model_dir)
    model = Llama(cfg)
    store = _store(40, 4, 30, 0, vocab=cfg.vocab_size)
    loader = make_loader([store], [1.0], _dcfg(packing=True), 4, 0, None, prefetch=0)
    batch = next(loader)
    loader.close()
    assert batch["input_ids"].shape == (4, 64) and (batch["segment_ids"].max(1) >= 2).all()
    packed = model.apply({"params": params}, batch["input_ids"], batch["valid"], positions=batch["position_ids"],
                         segment_ids=batch["segment_ids"])
    alone_fn = jax.jit(lambda ids: model.apply({"params": params}, ids))
    checked = 0
    for r in range(4):
        for seg in range(1, batch["segment_ids"][r].max() + 1):
            cols = np.flatnonzero(batch["segment_ids"][r] == seg)
            assert np.array_equal(batch["position_ids"][r, cols], np.arange(len(cols)))
            alone = alone_fn(batch["input_ids"][r, cols][None])
            np.testing.assert_allclose(np.asarray(packed[r, cols]), np.asarray(alone[0]), atol=1e-5, rtol=0)
            # Labels are the example's own next tokens: nothing crosses into the next segment.
            checked += 1
    assert checked >= 8


def test_packed_rows_under_a_target_budget(tiny_model_dir):
    """With sparse targets, packing fits each row's targets into head slots as well as its tokens
    into the row: every slot with weight points at a target of its own example with that
    example's next token as label, and the loss and hit count equal those of the same rows with
    the head at every position."""
    import jax

    from sftjax.data.pipeline import head_slots
    from sftjax.io.load import load_pretrained
    from sftjax.models.llama import Llama
    from sftjax.train.step import token_stats

    cfg, params, _ = load_pretrained(tiny_model_dir)
    store = _store(80, 6, 30, 4, vocab=cfg.vocab_size, tail=3)
    slots = head_slots([store], 64, packing=True)
    assert slots is not None and slots < 32 and head_slots([store], 64) == 8
    loader = make_loader([store], [1.0], _dcfg(packing=True), 4, 0, slots, prefetch=0)
    batches = [next(loader) for _ in range(3)]
    state, want = loader.get_state(), next(loader)
    loader.close()
    again = make_loader([store], [1.0], _dcfg(packing=True), 4, 0, slots, prefetch=0)
    again.set_state(state)  # a resumed run continues with exactly the next batch, slots included
    got = next(again)
    again.close()
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    for b in batches:
        assert b["head_positions"].shape == b["labels"].shape == b["weights"].shape == (4, slots)
        for r in range(4):
            seg, pos, w = b["segment_ids"][r], b["head_positions"][r], b["weights"][r]
            want = []  # the last 3 input positions of each example predict its 3 target tokens
            for s in range(1, seg.max() + 1):
                cols = np.flatnonzero(seg == s)
                want += list(cols[-3:])
                inner = np.isin(pos, cols[:-1]) & (w > 0)  # a label inside the row is the next input
                assert np.array_equal(b["labels"][r][inner], b["input_ids"][r][pos[inner] + 1])
            assert sorted(pos[w > 0]) == want
    assert np.mean([b["valid"].mean() for b in batches]) > 0.9  # the budget left packing nearly as full
    model = Llama(cfg)
    stats = jax.jit(lambda b: token_stats(model, {}, {"params": params}, b))
    for b in batches:
        full = {k: b[k] for k in ("input_ids", "valid", "segment_ids", "position_ids")}
        labels, weights = np.zeros_like(b["input_ids"]), np.zeros(b["input_ids"].shape, np.float32)
        for r in range(4):
            keep = b["weights"][r] > 0
            labels[r, b["head_positions"][r][keep]] = b["labels"][r][keep]
            weights[r, b["head_positions"][r][keep]] = b["weights"][r][keep]
        got, ref = stats(b), stats({**full, "labels": labels, "weights": weights})
        np.testing.assert_allclose(got["loss_sum"], ref["loss_sum"], rtol=1e-5)
        for k in ("tokens", "correct", "exact", "rows"):
            assert float(got[k]) == float(ref[k]), k


def test_packed_target_slots_of_one_row():
    """Slots are example-local target positions plus the segment's first column; an empty slot
    points at column 0 with weight 0 even when column 0 is itself a target."""
    from sftjax.data.tokens import packed_targets

    row = {"segment_ids": np.array([1, 1, 2, 2, 2, 0]), "labels": np.arange(10, 16),
           "weights": np.array([1, 0, 0, 1, 1, 0], np.float32), "source": np.zeros(6, np.int32)}
    out = packed_targets(row, np.array([0, 1, 2, 0]), np.array([1, 2, 2, 0]))
    assert out["head_positions"].tolist() == [0, 3, 4, 0]
    assert out["labels"].tolist() == [10, 13, 14, 10] and out["weights"].tolist() == [1, 1, 1, 0]


def test_packing_efficiency_and_bucket_shapes():
    stores = [_store(300, 5, 60, 1)]
    loader = make_loader(stores, [1.0], _dcfg(packing=True, max_length=256), 8, 0, None, prefetch=0)
    fill = np.mean([next(loader)["valid"].mean() for _ in range(20)])
    loader.close()
    assert fill > 0.95
    loader = make_loader(stores, [1.0], _dcfg(buckets=3), 8, 0, None, prefetch=0)
    shapes = {next(loader)["input_ids"].shape for _ in range(40)}
    loader.close()
    assert 1 < len(shapes) <= 3 and all(s[0] == 8 and s[1] % 8 == 0 for s in shapes)


@pytest.mark.parametrize("packing", [False, True])
def test_mixture_ratio_and_resume_position(packing):
    stores = [_store(200, 5, 30, 2), _store(100, 5, 30, 3)]
    d = _dcfg(packing=packing)
    loader = make_loader(stores, [0.8, 0.2], d, 8, 0, None)
    seen = []
    for _ in range(30):
        b = next(loader)
        starts = (b["segment_ids"] > 0) & (b["position_ids"] == 0) if packing else np.zeros_like(b["valid"])
        if not packing:
            starts[:, 0] = True
        seen.append(b["source"][starts])
    state = loader.get_state()
    want = [next(loader) for _ in range(3)]
    loader.close()
    src = np.concatenate(seen)
    assert abs((src == 1).mean() - 0.2) < 0.05, (src == 1).mean()
    again = make_loader(stores, [0.8, 0.2], d, 8, 0, None)
    again.set_state(state)
    got = [next(again) for _ in range(3)]
    again.close()
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_two_processes_read_disjoint_halves_of_the_same_global_batch():
    stores = [_store(64, 5, 30, 4)]
    d = _dcfg(num_shards=2)
    whole = make_loader(stores, [1.0], d, 8, 0, None, prefetch=0)
    halves = [make_loader(stores, [1.0], d, 8, 0, None, process_index=p, process_count=2, prefetch=0) for p in (0, 1)]
    for _ in range(3):
        g, h0, h1 = next(whole), next(halves[0]), next(halves[1])
        assert np.array_equal(g["input_ids"], np.concatenate([h0["input_ids"], h1["input_ids"]]))
        assert not set(map(tuple, h0["input_ids"])) & set(map(tuple, h1["input_ids"]))
    for ld in [whole, *halves]:
        ld.close()
    with pytest.raises(UserError, match="data.num_shards"):
        make_loader(stores, [1.0], _dcfg(num_shards=3), 8, 0, None, process_count=2)


def test_packed_mixture_run_reports_each_source(tiny_config, tmp_path, capsys):
    """A packed two-source run: per-source train/eval loss, data report and examples in TensorBoard."""
    import os

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sftjax.cli import main
    from sftjax.train.loop import run

    data = os.path.dirname(tiny_config.data.train)
    cfg = tiny_config
    cfg.data.train = ""
    cfg.data.mixture = ((cfg_path := os.path.join(data, "chat.jsonl"), 0.75),
                        (os.path.join(data, "formats", "sharegpt.jsonl"), 0.25))
    cfg.data.packing = True
    cfg.data.max_length = 128
    cfg.train.batch_size = 4
    results = run(cfg, str(tmp_path / "w"))
    assert set(results["data"]) == {cfg_path, cfg.data.mixture[1][0]}
    assert all(r["examples"] > 0 for r in results["data"].values())
    ev = EventAccumulator(str(tmp_path / "w" / "tb"), size_guidance={"tensors": 0})
    ev.Reload()
    tags = ev.Tags()
    assert {"train/loss/chat", "train/nonpad_fraction"} <= set(tags["scalars"])
    assert any(t.startswith("data/chat/0") for t in tags["tensors"])
    assert "loss/chat" in results["after"]["eval"]

    # The same data as the CLI shows it: counts per source, trained tokens in [[brackets]].
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("from sftjax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                        f"    c.model.path = {tiny_config.model.path!r}\n    c.data.train = {cfg_path!r}\n    return c\n")
    assert main(["data", "inspect", f"--config={cfg_file}", "-n", "1", "--config.data.loss_on=last_assistant"]) == 0
    out = capsys.readouterr().out
    assert "% trained" in out and "[[" in out and "<|im_end|>]]" in out


def test_loader_position_saved_in_the_orbax_step(tmp_path):
    """Saved at step 3 while training goes on (async model save): restore continues at batch 4."""
    import jax.numpy as jnp

    from sftjax.config import base_config
    from sftjax.train.checkpoint import Checkpointer

    stores = [_store(100, 5, 30, 0)]
    loader = make_loader(stores, [1.0], _dcfg(packing=True), 8, 0, None)
    for _ in range(3):
        next(loader)
    ckpt = Checkpointer(str(tmp_path), base_config().checkpoint)
    state = {"w": jnp.ones(3)}
    ckpt.save(3, state, loader)
    want = [next(loader) for _ in range(4)]
    ckpt.close()
    assert (tmp_path / "checkpoints" / "3" / "data").is_dir()
    again = make_loader(stores, [1.0], _dcfg(packing=True), 8, 0, None)
    ckpt = Checkpointer(str(tmp_path), base_config().checkpoint)
    ckpt.restore(3, state, again)
    got = [next(again) for _ in range(4)]
    for ld in (loader, again):
        ld.close()
    ckpt.close()
    for a, b in zip(want, got, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_load_errors_and_eval_split(tmp_path, smol_tokenizer):
    import json

    from sftjax.data.pipeline import load

    def write(name, rows):
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(p)

    cfg = base_config()
    cfg.data.train = write("empty.jsonl", [{"prompt": "a", "completion": " "}, {"prompt": "b", "completion": ""}])
    with pytest.raises(UserError, match=r"empty.jsonl: no records left after filtering .*empty_reply.: 2"):
        load(cfg, smol_tokenizer)
    cfg.data.train = write("train.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(100)])
    cfg.data.eval = write("eval.jsonl", [{"prompt": "x", "completion": "y"}])
    got = load(cfg, smol_tokenizer)
    assert len(got.train[0]) == 100 and [r.where for r in got.eval_records] == [f"{cfg.data.eval}:1"]
    cfg.data.eval, cfg.data.eval_fraction = "", 0.2
    got = load(cfg, smol_tokenizer)
    n_eval = len(got.eval)
    assert 10 <= n_eval <= 30 and len(got.train[0]) + n_eval == 100  # a hashed 20%, the same every run
    assert got.report[cfg.data.train]["held_out"] == n_eval
    assert not set(got.train[0].wheres) & {r.where for r in got.eval_records}
    assert [r.where for r in load(cfg, smol_tokenizer).eval_records] == [r.where for r in got.eval_records]
    cfg.data.mixture = ((cfg.data.train, 1.0),)
    with pytest.raises(UserError, match="either data.train or data.mixture"):
        load(cfg, smol_tokenizer)
    for bad in (((cfg.data.train, 0),), ((cfg.data.train, "lots"),), (cfg.data.train,)):
        cfg.data.mixture = bad
        cfg.data.train = ""
        with pytest.raises(UserError, match=r"data.mixture\[0\]"):
            load(cfg, smol_tokenizer)


def test_resuming_with_a_differently_shaped_pipeline_is_a_clean_error():
    stores = [_store(100, 5, 30, 0)]
    packed = make_loader(stores, [1.0], _dcfg(packing=True), 8, 0, None, prefetch=0)
    next(packed)
    bucketed = make_loader(stores, [1.0], _dcfg(packing=False), 8, 0, None, prefetch=0)
    with pytest.raises(UserError, match="data position does not fit the current data config"):
        bucketed.set_state(packed.get_state())
