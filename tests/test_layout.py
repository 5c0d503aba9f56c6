"""The 0.1 flat module paths still import (with a DeprecationWarning naming the new home), and
the public API is what opt_jax re-exports."""

import importlib
import sys

import pytest

import opt_jax


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("opt_jax.decoding", "opt_jax.generation", "generate"),
        ("opt_jax.train", "opt_jax.training.train", "train_and_evaluate"),
        ("opt_jax.convert", "opt_jax.checkpoints.hf", "load_pretrained"),
        ("opt_jax.sharding", "opt_jax.parallel.sharding", "make_mesh"),
    ],
)
def test_old_module_paths_warn_and_resolve(old, new, name):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new) and hasattr(module, name)


def test_public_api():
    for name in opt_jax.__all__:
        assert hasattr(opt_jax, name), name
    assert {"generate", "GenerationConfig", "quantize", "load_pretrained"} <= set(opt_jax.__all__)
