"""Next-token loss over the vocabulary head without materialising all logits.

A 49k (or 152k) vocabulary makes the logits the largest activation of a small model's step:
8 x 256 tokens x 49,152 x 4 bytes is 400 MB, held for the backward pass together with its
softmax. Here the head runs over chunks of `CHUNK_ELEMENTS // vocab` tokens in a scan, and the
loss is a custom-VJP function whose forward pass also does the head's backward for each chunk
(softmax minus one-hot, times the token weight, pulled back through the head by `jax.vjp`): only
the gradient with respect to the hidden states [tokens, hidden] and the trainable head leaves
survive the chunk. The FLOPs are those of the plain head (logits forward, input gradient, weight
gradient only where the head trains); the memory is one chunk's logits.

The head is whatever the model's `features=` call runs (final norm, `lm_head` or the tied
embeddings), with the model's hooks, so LoRA or QLoRA on `lm_head` work unchanged. Only the summed
loss is differentiable; the per-token NLL and hits are for metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from sftjax.params import merge

CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MiB in float32
HEAD_KEYS = ("norm", "lm_head", "embed_tokens")  # the params a `features=` call reads


def chunk_size(tokens: int, vocab: int) -> int:
    """Tokens per chunk: a power of two, at most `tokens` rounded up, at least 16."""
    c = 16
    while c * 2 * vocab <= CHUNK_ELEMENTS and c < tokens:
        c *= 2
    return c


def token_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(negative log-likelihood of each label, whether it is the argmax, the log-normaliser)
    over logits [..., vocab]."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return logz - picked, jnp.argmax(logits, axis=-1) == labels, logz


def head_subtree(tree: Mapping) -> dict:
    return {k: tree[k] for k in HEAD_KEYS if k in tree}


def _chunks(x: jax.Array, c: int) -> jax.Array:
    """[N, ...] -> [N / c, c, ...], zero-padded to a multiple of c. Chunk j holds tokens j, j + N/c,
    j + 2N/c, ...: tokens are sharded over the batch's mesh axes in contiguous blocks, so every
    device keeps its share of every chunk (contiguous chunks would each live on one device)."""
    n = x.shape[0]
    pad = -n % c
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    return x.reshape(c, -1, *x.shape[1:]).swapaxes(0, 1)


def _unchunk(x: jax.Array, n: int) -> jax.Array:
    """Inverse of `_chunks` (the first n tokens)."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])[:n]


def _scan_head(head, h, trainable, frozen, labels, weights, with_grad: bool):
    """(loss_sum, nll [N], hit [N], d loss/d h [N, D] or None, d loss/d trainable or None)."""
    n = h.shape[0]
    c = chunk_size(n, head_vocab(head, h[:1], trainable, frozen))
    xs = (_chunks(h, c), _chunks(labels, c), _chunks(weights, c))

    def logits_of(hc, tp):
        return head(merge(frozen, tp), hc)

    def body(acc, chunk):
        hc, lc, wc = chunk
        if with_grad:
            logits, pull = jax.vjp(logits_of, hc, trainable)
        else:
            logits = logits_of(hc, trainable)
        nll, hit, logz = token_nll(logits, lc)
        loss = acc[0] + (nll * wc).sum()
        if not with_grad:
            return (loss,), (nll, hit)
        probs = jnp.exp(logits - logz[:, None])
        dlogits = probs.at[jnp.arange(c), lc].add(-1.0) * wc[:, None]
        dh, dtp = pull(dlogits)
        return (loss, jax.tree.map(jnp.add, acc[1], dtp)), (nll, hit, dh)

    init = (jnp.zeros((), jnp.float32),)
    if with_grad:
        init += (jax.tree.map(jnp.zeros_like, trainable),)
    acc, outs = jax.lax.scan(body, init, xs)
    nll, hit = _unchunk(outs[0], n), _unchunk(outs[1], n)
    if not with_grad:
        return acc[0], nll, hit, None, None
    return acc[0], nll, hit, _unchunk(outs[2], n).astype(h.dtype), acc[1]


def head_vocab(head, h, trainable, frozen) -> int:
    """The head's output width, from its abstract evaluation (no FLOPs)."""
    return jax.eval_shape(lambda: head(merge(frozen, trainable), h)).shape[-1]


def head_loss(head: Callable, h: jax.Array, trainable: Mapping, frozen: Mapping, labels: jax.Array,
              weights: jax.Array):
    """(sum of weights x NLL, NLL [N], argmax == label [N]) of `head(params, h)` logits over
    hidden states h [N, D]; differentiable in h and `trainable` through the summed loss only.

    `head(params, h) -> logits [n, vocab]` must read only `trainable` and `frozen` (head subtrees)."""

    @jax.custom_vjp
    def fused(h, tp, fp, labels, weights):
        return _scan_head(head, h, tp, fp, labels, weights, False)[:3]

    def fwd(h, tp, fp, labels, weights):
        loss, nll, hit, dh, dtp = _scan_head(head, h, tp, fp, labels, weights, True)
        return (loss, nll, hit), (dh, dtp, fp, weights)

    def bwd(res, g):
        dh, dtp, fp, weights = res
        scale = g[0]  # the per-token outputs are metrics: their cotangents are not used
        return (dh * scale.astype(dh.dtype), jax.tree.map(lambda x: x * scale, dtp),
                jax.tree.map(jnp.zeros_like, fp), None, jnp.zeros_like(weights))

    fused.defvjp(fwd, bwd)
    return fused(h, trainable, frozen, labels, weights)
