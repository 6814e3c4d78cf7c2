"""The jitted train and eval steps.

Only the trainable subtree is differentiated; the frozen base is an ordinary argument that is
never donated and never reaches the optimizer. The loss is the sum of token losses divided by the
number of target tokens in the *global* batch: with gradient accumulation the micro-batch sums
are added up in a scan and divided once, so K micro-batches give the same update as one batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sftjax.models.llama import Llama
from sftjax.params import merge
from sftjax.train.loss import head_loss, head_subtree, token_nll
from sftjax.train.optim import make_optimizer
from sftjax.train.regularisers import fgm


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any


def opt_state_shardings(tx: optax.GradientTransformation, trainable, mesh):
    """Where each optimizer-state leaf lives: a leaf that mirrors a parameter (AdamW's and Lion's
    moments) with that parameter's sharding, anything else (step counts, Adafactor's factored
    moments) replicated. Left to itself, `jit(tx.init)` puts the fresh zeros on one device, and
    the state ended up replicated on every device, unsharded by fsdp or tensor parallelism."""
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(tx.init, trainable)
    return optax.tree_map_params(tx, lambda s, p: p.sharding if s.shape == p.shape else replicated, abstract,
                                 trainable, transform_non_params=lambda _: replicated)


def init_state(setup, optim_cfg, total_steps: int):
    """(TrainState at step 0, optimizer, schedule); also the restore target for checkpoints."""
    tx, sched = make_optimizer(optim_cfg, setup.trainable, total_steps)
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, setup.trainable, setup.mesh))(setup.trainable)
    state = TrainState(jnp.zeros((), jnp.int32), setup.trainable, opt_state)
    # Pin every leaf to a mesh sharding (scalars: replicated), so the jitted step's outputs match
    # its inputs and it compiles exactly once.
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    shardings = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, state)
    return jax.device_put(state, shardings), tx, sched


def token_stats(model, trainable, frozen, batch, rng=None, num_sources: int = 1):
    """Summed NLL over target tokens, their count, correct-argmax count, per-row exact match;
    with several data sources also the NLL and token count of each (`source` ids per token).

    Packed rows carry `segment_ids` and per-segment `position_ids`: attention stays inside each
    example and positions restart, so a packed example computes what it would alone."""
    args = dict(positions=batch.get("position_ids"), segment_ids=batch.get("segment_ids"),
                head_positions=batch.get("head_positions"), rngs=None if rng is None else {"dropout": rng})
    labels, w = batch["labels"], batch["weights"]
    if isinstance(getattr(model, "base", None), Llama) and not model.cfg.num_labels:  # a vocabulary head: chunked (train/loss.py)
        h = model.apply(merge(frozen, trainable), batch["input_ids"], batch["valid"], features_only=True, **args)
        head = lambda params, x: model.apply(params, None, features=x, rngs=args["rngs"])  # noqa: E731
        loss_sum, nll, hit = head_loss(head, h.reshape(-1, h.shape[-1]), head_subtree(trainable),
                                       head_subtree(frozen), labels.reshape(-1), w.reshape(-1))
        nll, hit = nll.reshape(labels.shape) * w, hit.reshape(labels.shape)
    else:
        logits = model.apply(merge(frozen, trainable), batch["input_ids"], batch["valid"], **args)
        nll, hit, _ = token_nll(logits, labels)
        nll = nll * w
        loss_sum = nll.sum()
    hit = hit | (w == 0)
    out = {"loss_sum": loss_sum, "tokens": w.sum(), "correct": (hit * w).sum(),
           "exact": (hit.all(-1) & (w.sum(-1) > 0)).sum(), "rows": (w.sum(-1) > 0).sum()}
    if num_sources > 1 and "source" in batch:
        src = batch["source"].reshape(-1)
        out["loss_by_source"] = jax.ops.segment_sum(nll.reshape(-1), src, num_segments=num_sources)
        out["tokens_by_source"] = jax.ops.segment_sum(w.reshape(-1), src, num_segments=num_sources)
    return out


def make_train_step(model, tx: optax.GradientTransformation, schedule, grad_accum: int, dropout: bool, seed: int,
                    state_sharding=None, num_sources: int = 1, fgm_epsilon: float = 0.0):
    """Jitted (state, frozen, batch) -> (state, metrics); batch leaves are [global_batch, ...].

    The state is donated (updated in place); `frozen` is not. `state_sharding` pins the output
    state to the input's shardings so the step never recompiles. `dropout`: pass an rng (LoRA
    dropout, NEFTune). `fgm_epsilon` > 0 adds FGM adversarial training (`sftjax.train.regularisers`).
    """

    def summed_loss(trainable, frozen, mb, rng):
        stats = token_stats(model, trainable, frozen, mb, rng, num_sources)
        by_source = {k: stats[k] for k in ("loss_by_source", "tokens_by_source") if k in stats}
        return stats["loss_sum"], (stats["tokens"], by_source)

    value_and_grad = jax.value_and_grad(summed_loss, has_aux=True)
    if fgm_epsilon > 0:
        value_and_grad = fgm(value_and_grad, fgm_epsilon, model.cfg.hidden_size)

    def step(state: TrainState, frozen: Mapping, batch: Mapping):
        key = jax.random.fold_in(jax.random.key(seed), state.step) if dropout else None
        # Micro-batch i takes rows i, i+K, i+2K, ...: every device keeps its share of each
        # micro-batch, where contiguous splits would leave most devices idle per micro-step.
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
                             batch)

        def body(carry, xs):
            g_sum, n_sum, l_sum, src_sum = carry
            mb, i = xs
            rng = None if key is None else jax.random.fold_in(key, i)
            (loss_sum, (n, by_source)), g = value_and_grad(state.trainable, frozen, mb, rng)
            return (jax.tree.map(jnp.add, g_sum, g), n_sum + n, l_sum + loss_sum,
                    jax.tree.map(jnp.add, src_sum, by_source)), None

        zero = jnp.zeros((), jnp.float32)
        src_zero = ({"loss_by_source": jnp.zeros(num_sources), "tokens_by_source": jnp.zeros(num_sources)}
                    if num_sources > 1 and "source" in batch else {})
        init = (jax.tree.map(jnp.zeros_like, state.trainable), zero, zero, src_zero)
        (grads, tokens, loss_sum, by_source), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss, grad_norm = loss_sum / denom, optax.tree.norm(grads)
        # A non-finite loss or gradient leaves parameters and optimizer state as they were. The
        # optimizer runs under a `cond` (no host sync, no recompilation; a select per leaf
        # instead cost an extra pass over parameters and moments, 0.2 s of a 0.7 s AdamW update
        # on 135M parameters, and memory: full fine-tuning 8x256, 2.31 vs 1.86 GiB of XLA
        # temporaries). Parameters stay outside it: the cond returns the updates (-0.0 when
        # skipped: p + -0.0 is p, bit for bit) and they are added after. With the parameters
        # updated inside, XLA copied every trainable parameter that entered the cond (full
        # fine-tuning 8x64: 1.60 vs 1.00 GiB of temporaries). The flag goes out with the metrics.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(args):
            opt_state, grads = args
            updates, opt_state = tx.update(grads, opt_state, state.trainable)
            return opt_state, updates

        def keep(args):
            opt_state, grads = args
            return opt_state, jax.tree.map(lambda g: jnp.full_like(g, -0.0), grads)

        opt_state, updates = jax.lax.cond(finite, update, keep, (state.opt_state, grads))
        trainable, update_norm = optax.apply_updates(state.trainable, updates), optax.tree.norm(updates)
        # The norm of the updated parameters: read from the old ones, which are donated and
        # overwritten in place by the update, XLA copied every trainable parameter at the start
        # of the step (0.5 GiB for full fine-tuning of a 135M model, one pass each way).
        param_norm = optax.tree.norm(trainable)
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": tokens, "lr": schedule(state.step),
                   "param_norm": param_norm, "nonfinite": (~finite).astype(jnp.int32),
                   "update_ratio": update_norm / jnp.maximum(param_norm, 1e-12),
                   **by_source}
        return TrainState(state.step + 1, trainable, opt_state), metrics

    out = None if state_sharding is None else (state_sharding, None)
    return jax.jit(step, donate_argnums=(0,), out_shardings=out)


def make_eval_step(model, num_sources: int = 1):
    """trainable, frozen, batch -> summed token statistics (add them up over batches)."""
    return jax.jit(lambda trainable, frozen, batch: token_stats(model, trainable, frozen, batch, None, num_sources))


def make_predict_step(model):
    """trainable, frozen, batch -> (argmax class [B, K], its probability [B, K]) at the head
    positions (all positions without them): a task head's predictions and confidences."""

    def predict(trainable, frozen, batch):
        logits = model.apply(merge(frozen, trainable), batch["input_ids"], batch["valid"],
                             positions=batch.get("position_ids"), segment_ids=batch.get("segment_ids"),
                             head_positions=batch.get("head_positions"))
        return jnp.argmax(logits, -1).astype(jnp.int32), jax.nn.softmax(logits, -1).max(-1)

    return jax.jit(predict)
