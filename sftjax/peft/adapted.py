"""The extension point: a model plus the transforms that adapt it, without touching `models/`.

A `Transform` (a PEFT method or an input transform) may
1. `prepare` the param tree before the model runs (differentiably: prompt tuning turns its
   virtual tokens into per-layer keys/values here),
2. `intercept` the model's hook points (a Flax method interceptor; the hook points are listed in
   `sftjax/models/layers.py`), reading its own leaves from the intercepted module's params, so the
   tree alone decides which layers it touches (a `Dense` with `lora_a`/`lora_b` gets LoRA),
3. `fold` its leaves back into plain base weights for a merged export (or refuse to),
4. name the logical `axes` of the leaves it adds, so they shard like the rest of the tree.

`Adapted.apply(params, ...)` runs the model with every transform in place; train step, evaluation,
generation and export all go through it. Adding a method means writing one Transform and naming
it in `sftjax/build.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import flax.linen as nn


class Transform:
    """Base class: every method is a no-op, so a transform overrides only what it needs."""

    def prepare(self, model: Adapted, params: Mapping) -> Mapping:
        return params

    def intercept(self, next_fun, args, kwargs, context):
        return next_fun(*args, **kwargs)

    def fold(self, params: Mapping) -> Mapping:
        return params

    def axes(self, path: str, ndim: int, base: Mapping[str, tuple]) -> tuple | None:
        """Logical axes of the leaf at `path` if this transform put it in the tree (`base`: the
        model's own leaves' axes by path), else None."""
        return None


def hook(context, module_type: type, method: str = "__call__") -> bool:
    """Whether an interceptor's `context` is the hook point `module_type.method`."""
    return context.method_name == method and isinstance(context.module, module_type)


@dataclass(eq=False)  # hashed by identity: a compiled step or generator is kept per model
class Adapted:
    """`base` (a models/ architecture) run with `transforms`, the first one outermost."""

    base: nn.Module
    transforms: tuple[Transform, ...] = ()

    @property
    def cfg(self):
        return self.base.cfg

    def prepare(self, params: Mapping) -> Mapping:
        for t in self.transforms:
            params = t.prepare(self, params)
        return params

    def apply(self, params: Mapping, *args, rngs=None, **kwargs):
        """`base.apply({"params": prepare(params)}, ...)` inside every transform's interceptor.
        Training passes `rngs={"dropout": key}`; without it transforms act as in evaluation."""
        params = self.prepare(params)
        with contextlib.ExitStack() as stack:
            for t in self.transforms:
                stack.enter_context(nn.intercept_methods(t.intercept))
            return self.base.apply({"params": params}, *args, rngs=rngs, **kwargs)

    def fold(self, params: Mapping) -> Mapping:
        """Plain base-model params (innermost transform first), e.g. for a merged HF export."""
        for t in reversed(self.transforms):
            params = t.fold(params)
        return params
