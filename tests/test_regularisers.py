"""NEFTune (embedding noise in training only) and FGM (adversarial embedding perturbation)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sftjax.params import flatten
from sftjax.peft.adapted import Adapted
from sftjax.train.regularisers import NEFTune, fgm, neftune_noise


def _setup_and_batch(cfg):
    from helpers import first_batch

    from sftjax.build import build

    setup = build(cfg)
    batch = first_batch(setup, cfg)
    return setup, batch


def test_neftune_noise_bound_and_only_in_training(tiny_config):
    noise = np.asarray(neftune_noise(jax.random.key(0), (4, 32, 64), 5.0))
    bound = 5.0 / np.sqrt(32 * 64)
    assert np.abs(noise).max() <= bound and np.abs(noise).max() > 0.9 * bound and abs(noise.mean()) < 0.05 * bound

    cfg = tiny_config
    cfg.train.neftune_alpha = 5.0
    setup, batch = _setup_and_batch(cfg)
    assert NEFTune(5.0) in setup.model.transforms
    plain = Adapted(setup.model.base, tuple(t for t in setup.model.transforms if not isinstance(t, NEFTune)))
    params = setup.full_params()
    ids = batch["input_ids"]
    eval_logits = np.asarray(setup.model.apply(params, ids))
    np.testing.assert_array_equal(eval_logits, np.asarray(plain.apply(params, ids)))  # off in eval
    train_logits = np.asarray(setup.model.apply(params, ids, rngs={"dropout": jax.random.key(1)}))
    assert np.abs(train_logits - eval_logits).max() > 1e-4  # on in training
    no_noise = np.asarray(plain.apply(params, ids, rngs={"dropout": jax.random.key(1)}))
    np.testing.assert_array_equal(no_noise, eval_logits)

    # The real train step with NEFTune (it needs the rng) runs and moves away from the noise-free step.
    from helpers import init_state

    from sftjax.train.step import make_train_step

    def one_step(model, rng):
        state, tx, sched = init_state(setup, cfg)
        state = state.replace(trainable=jax.tree.map(jnp.copy, state.trainable))
        state, m = make_train_step(model, tx, sched, 1, rng, 0)(state, setup.frozen, batch)
        return flatten(state.trainable), float(m["loss"])

    noisy, l1 = one_step(setup.model, True)
    clean, l0 = one_step(setup.model, False)
    assert np.isfinite(l1) and l1 != l0
    assert any(not np.array_equal(np.asarray(noisy[k]), np.asarray(clean[k])) for k in clean)


def test_fgm_sums_clean_and_adversarial_gradients(tiny_config):
    from helpers import init_state

    from sftjax.train.step import make_train_step, token_stats

    cfg = tiny_config
    cfg.train.fgm_epsilon = 1.0  # the model gets FGM's perturbation hook (EmbedDelta)
    setup, batch = _setup_and_batch(cfg)
    model = setup.model

    def value_and_grad(trainable, frozen, mb, rng):
        def f(t):
            s = token_stats(model, t, frozen, mb, rng)
            return s["loss_sum"], s["tokens"]
        return jax.value_and_grad(f, has_aux=True)(trainable)

    train = jax.tree.map(lambda x: x + 0.01, setup.trainable)  # B != 0 so every gradient is non-zero
    (l0, n0), g0 = jax.jit(value_and_grad)(train, setup.frozen, batch, None)
    (le, ne), ge = jax.jit(fgm(value_and_grad, 0.0, 64))(train, setup.frozen, batch, None)
    (l1, n1), g1 = jax.jit(fgm(value_and_grad, 1.0, 64))(train, setup.frozen, batch, None)
    assert float(le) == float(l0) == float(l1) and float(n1) == float(n0)  # the clean loss is reported
    for k, v in flatten(g0).items():
        # epsilon 0: the adversarial pass equals the clean one, so the sum is exactly twice it.
        np.testing.assert_allclose(np.asarray(flatten(ge)[k]), 2 * np.asarray(v), rtol=1e-6, atol=1e-9)
    diff = max(float(np.abs(np.asarray(flatten(g1)[k]) - 2 * np.asarray(v)).max()) for k, v in flatten(g0).items())
    assert diff > 1e-4, diff

    # Through the jitted step: FGM changes the (SGD) update; epsilon 0 leaves the step as it was.
    def update(eps):
        state, _, sched = init_state(setup, cfg)
        state = state.replace(trainable=jax.tree.map(jnp.copy, train), opt_state=optax.sgd(1.0).init(train))
        step = make_train_step(model, optax.sgd(1.0), sched, 1, False, 0, fgm_epsilon=eps)
        new, m = step(state, setup.frozen, batch)
        return {k: np.asarray(v) - np.asarray(flatten(train)[k]) for k, v in flatten(new.trainable).items()}

    u0, u_adv = update(0.0), update(1.0)
    n = float(n0)
    tol = 2e-8  # (params + update) - params in float32 around |params| ~ 0.05: a few ulps
    for k, v in flatten(g0).items():
        np.testing.assert_allclose(u0[k], -np.asarray(v) / n, rtol=1e-6, atol=tol)
        np.testing.assert_allclose(u_adv[k], -np.asarray(flatten(g1)[k]) / n, rtol=1e-6, atol=tol)
    assert max(float(np.abs(u_adv[k] - 2 * u0[k]).max()) for k in u0) > 50 * tol


def test_train_run_with_neftune_and_fgm(tiny_config, tmp_path):
    from sftjax.train.loop import run

    cfg = tiny_config
    cfg.train.neftune_alpha, cfg.train.fgm_epsilon = 5.0, 1.0
    res = run(cfg, str(tmp_path / "run"))
    assert np.isfinite(res["after"]["eval"]["loss"]) and res["after"]["eval"]["loss"] != res["before"]["eval"]["loss"]
