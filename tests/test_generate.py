import numpy as np

from sftjax.infer.generate import greedy


def _reference(model, params, prompt, n):
    """Greedy by re-running the full model on the growing sequence (no cache, no padding)."""
    seq = list(prompt)
    for _ in range(n):
        logits = np.asarray(model.apply(params, np.asarray([seq], np.int32)))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_cached_batched_greedy_equals_full_recompute(tiny_config):
    from sftjax.build import build

    setup = build(tiny_config)
    params = setup.frozen
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 3000, n).astype(np.int32) for n in (5, 11, 17)]  # unequal: left padding
    got = greedy(setup.model, params, prompts, 12, eos_id=None, pad_id=2)
    for p, g in zip(prompts, got, strict=True):
        assert g.tolist() == _reference(setup.model, params, p, 12)


def test_stops_at_eos(tiny_config):
    from sftjax.build import build

    setup = build(tiny_config)
    prompt = np.asarray([5, 6, 7], np.int32)
    free = greedy(setup.model, setup.frozen, [prompt], 6, eos_id=None)[0]
    eos = int(free[2])  # pretend the third generated token is EOS
    first = int(np.argmax(free == eos))
    stopped = greedy(setup.model, setup.frozen, [prompt], 6, eos_id=eos)[0]
    assert stopped.tolist() == free[: first + 1].tolist()
