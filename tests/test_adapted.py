"""The extension point: a new PEFT method is one Transform, written here without touching models/."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.models.layers import Dense
from sftjax.params import flatten, merge, unflatten
from sftjax.peft.adapted import Adapted, Transform, hook


@dataclass(frozen=True)
class IA3(Transform):
    """(IA)^3-style: scale the outputs of every Dense whose params hold an `ia3` vector."""

    def intercept(self, next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if hook(context, Dense) and context.module.has_variable("params", "ia3"):
            y = y * context.module.get_variable("params", "ia3").astype(y.dtype)
        return y

    def fold(self, params):
        flat = flatten(params)
        for path in [p for p in flat if p.endswith("/ia3")]:
            mod = path[: -len("/ia3")]
            flat[f"{mod}/kernel"] = flat[f"{mod}/kernel"] * flat.pop(path)[..., None, :]
        return unflatten(flat)

    def axes(self, path, ndim, base):
        mod, _, leaf = path.rpartition("/")
        return base[f"{mod}/kernel"][:-2] + base[f"{mod}/kernel"][-1:] if leaf == "ia3" else None


def test_a_new_method_plugs_in_by_the_tree_alone(tiny_config):
    from sftjax.build import build

    tiny_config.lora.enabled = False
    setup = build(tiny_config)
    model = Adapted(setup.model.base, (IA3(),))
    base = setup.full_params()
    ids = np.random.default_rng(0).integers(0, 1000, (2, 9)).astype(np.int32)
    plain = np.asarray(setup.model.apply(base, ids))
    # Vectors of ones: exactly the base model (step-0 identity, as with LoRA's B = 0).
    ones = unflatten({"layers/mlp/up_proj/ia3": np.ones((2, 128), np.float32)})
    np.testing.assert_array_equal(np.asarray(model.apply(merge(base, ones), ids)), plain)
    # Only the layer that holds the leaf changes; folding it into the kernel gives the same logits.
    rng = np.random.default_rng(1)
    scales = unflatten({"layers/mlp/up_proj/ia3": (1 + 0.5 * rng.standard_normal((2, 128))).astype(np.float32)})
    adapted = np.asarray(model.apply(merge(base, scales), ids))
    assert np.abs(adapted - plain).max() > 1e-3
    folded = model.fold(merge(base, scales))
    np.testing.assert_allclose(np.asarray(setup.model.apply(folded, ids)), adapted, atol=2e-5)
    # Its leaves shard like the kernel's outputs: the transform names their logical axes.
    from sftjax.build import logical_axes

    axes = flatten(logical_axes(model, [scales, base]))
    assert axes["layers/mlp/up_proj/ia3"] == ("layers", "mlp")
    assert axes["layers/mlp/up_proj/kernel"] == ("layers", "embed", "mlp")
    assert "layers/mlp/up_proj/ia3" not in flatten(logical_axes(setup.model, [scales, base]))  # nobody claims it
    # It trains: the gradient reaches the new leaf through the jitted model.
    grad = jax.jit(jax.grad(lambda s: model.apply(merge(base, s), ids).sum()))(scales)
    assert float(jnp.abs(flatten(grad)["layers/mlp/up_proj/ia3"]).max()) > 0


def test_models_import_only_architecture_code():
    """models/ may use its own modules, the error type and param-tree paths; never PEFT, training, data or IO."""
    import ast
    import pathlib

    import sftjax.models

    allowed = ("sftjax.models", "sftjax.errors", "sftjax.params")
    for path in pathlib.Path(sftjax.models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                assert not name.startswith("sftjax") or name.startswith(allowed), f"{path.name} imports {name}"
