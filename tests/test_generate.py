import jax
import numpy as np

from sftjax.infer.generate import greedy


def _reference(apply, params, prompt, n):
    """Greedy by re-running the full model on the growing sequence (no cache, no padding).

    The sequence sits at the start of a fixed 64-token buffer so one jitted apply serves every step:
    attention is causal, so the tokens after it do not change the logits read at its end.
    `apply` is the model's `jax.jit(model.apply)`."""
    seq = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, 64), np.int32)
        buf[0, : len(seq)] = seq
        logits = np.asarray(apply(params, buf))
        seq.append(int(logits[0, len(seq) - 1].argmax()))
    return seq[len(prompt):]


def test_cached_batched_greedy_equals_full_recompute(tiny_config):
    from sftjax.build import build

    setup = build(tiny_config)
    params = setup.frozen
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 3000, n).astype(np.int32) for n in (5, 11, 17)]  # unequal: left padding
    got = greedy(setup.model, params, prompts, 12, eos_id=None, pad_id=2)
    apply = jax.jit(setup.model.apply)
    for p, g in zip(prompts, got, strict=True):
        assert g.tolist() == _reference(apply, params, p, 12)


def test_stops_at_eos(tiny_config):
    from sftjax.build import build

    setup = build(tiny_config)
    prompt = np.asarray([5, 6, 7], np.int32)
    free = greedy(setup.model, setup.frozen, [prompt], 6, eos_id=None)[0]
    eos = int(free[2])  # pretend the third generated token is EOS
    first = int(np.argmax(free == eos))
    stopped = greedy(setup.model, setup.frozen, [prompt], 6, eos_id=eos)[0]
    assert stopped.tolist() == free[: first + 1].tolist()


def test_second_call_with_the_same_shapes_compiles_nothing(tiny_config):
    from sftjax.build import build
    from sftjax.infer.generate import generator

    setup = build(tiny_config)
    gen = generator(setup.model)
    assert generator(setup.model) is gen  # one per model
    prompts = [np.arange(3, 9, dtype=np.int32), np.arange(20, 23, dtype=np.int32)]
    first = greedy(setup.model, setup.full_params(), prompts, 5, eos_id=None)
    traced = gen.traces
    assert traced == 2  # the prompt (prefill) and the one-token step
    again = greedy(setup.model, setup.full_params(), [p + 1 for p in prompts], 5, eos_id=None)
    assert gen.traces == traced  # same shapes: nothing traced, so nothing compiled
    assert len(again) == len(first) == 2


def test_cpu_decoding_unrolls_the_layers_and_decodes_as_the_scan_does(tiny_config):
    """On CPU the generator decodes through an unrolled copy of a scanned model (layers unstacked
    once per call); with trained LoRA adapters it picks the same tokens as the scanned model."""
    from sftjax.build import build
    from sftjax.infer.generate import Generator, generator
    from sftjax.params import flatten, unflatten

    tiny_config.lora.enabled = True
    setup = build(tiny_config)
    rng = np.random.default_rng(5)
    trainable = unflatten({p: (rng.normal(0, 0.5, v.shape).astype(np.float32) if p.endswith("lora_b") else v)
                           for p, v in flatten(setup.trainable).items()})
    params = setup.full_params(trainable)
    prompts = [rng.integers(3, 3000, n).astype(np.int32) for n in (4, 13)]
    gen = generator(setup.model)
    assert gen._unrolled is not None and not gen._unrolled.base.rt.scan_layers
    got = gen.greedy(params, prompts, 10, eos_id=None)
    assert gen.model is gen._unrolled
    scanned = Generator(setup.model)
    scanned._use_unrolled = False  # as for layer weights above UNROLL_MAX_BYTES
    want = scanned.greedy(params, prompts, 10, eos_id=None)
    assert scanned.model is setup.model
    assert [g.tolist() for g in got] == [w.tolist() for w in want]
