"""Shared fixtures: tiny random HF OPT models (the reference oracle) saved to temp dirs."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Parity with transformers needs true float32 matmuls: on NVIDIA GPUs JAX's default is TF32
# (logits off by ~1e-3; measured on an H100, see the README's "Scaling out").
if os.environ["JAX_PLATFORMS"] != "cpu":
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import numpy as np
import pytest

# Architecture variants of the published checkpoints, on odd sizes so shape mix-ups show.
BASE = dict(
    vocab_size=99,
    hidden_size=16,
    num_hidden_layers=2,
    ffn_dim=37,
    num_attention_heads=4,
    max_position_embeddings=40,
    init_std=0.25,
    dropout=0.0,
)
VARIANTS = {
    "pre_ln": {},
    "post_ln_project": dict(do_layer_norm_before=False, word_embed_proj_dim=8),
    "no_final_ln": dict(_remove_final_layer_norm=True),
    "no_bias": dict(enable_bias=False),
    "non_affine_ln": dict(layer_norm_elementwise_affine=False),
    "gelu": dict(activation_function="gelu"),
}
HEADS = ("OPTForCausalLM", "OPTForSequenceClassification", "OPTForQuestionAnswering")


def make_hf_model(variant: str = "pre_ln", head: str = "OPTForCausalLM", seed: int = 0, **extra):
    """A random transformers OPT model whose biases and LayerNorms are randomised too."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(BASE, **VARIANTS[variant], **extra)
    if head == "OPTForSequenceClassification":
        kwargs.setdefault("num_labels", 3)
    config = transformers.OPTConfig(**kwargs)
    model = getattr(transformers, head)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Default init makes biases 0 and LayerNorms (1, 0): randomise so every one matters.
            if name.endswith("bias") or "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return model


def random_tiny_model(init_std=0.25, noise_seed=1, **overrides):
    """(config, OPTForCausalLM, params) of a tiny opt_jax model whose every parameter (biases and
    LayerNorms included) is randomised, so none can be silently ignored."""
    import jax

    import opt_jax

    fields = dict(BASE, init_std=init_std, dropout=0.1)
    fields.update(overrides)
    config = opt_jax.OPTConfig(**fields)
    params = opt_jax.init_params(config, 0)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(noise_seed), len(leaves))
    leaves = [
        x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return config, opt_jax.OPTForCausalLM(config), jax.tree.unflatten(tree, leaves)


def save_hf(model, directory) -> str:
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture
def hf_dir(tmp_path):
    """Factory: (variant, head, **extra) -> (hf_model, directory)."""

    def build(variant="pre_ln", head="OPTForCausalLM", **extra):
        model = make_hf_model(variant, head, **extra)
        directory = tmp_path / f"{variant}-{head}"
        return model, save_hf(model, directory)

    return build


def ragged_batch(vocab_size=99, batch=3, length=11, pad_id=1, side="left", seed=0):
    """ids, mask [B, T] with rows of very different lengths (row 0 unpadded)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab_size, size=(batch, length))
    mask = np.ones((batch, length), np.int64)
    for row, pads in enumerate([0, 4, length - 2][:batch]):
        if side == "left":
            mask[row, :pads] = 0
        else:
            mask[row, length - pads :] = 0
    ids[mask == 0] = pad_id
    return ids, mask


def max_rel_diff(ours, ref, where=None):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if where is not None:
        ours, ref = ours[where], ref[where]
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def assert_trees_equal(a, b, **tolerances):
    """Asserts two pytrees hold the same leaves under the same paths: a missing, extra or
    renamed leaf fails (jax.tree.map requires equal structures). Bitwise unless tolerances
    (rtol / atol) are given."""
    import jax

    def check(path, x, y):
        where = jax.tree_util.keystr(path)
        if tolerances:
            np.testing.assert_allclose(x, y, err_msg=where, **tolerances)
        else:
            np.testing.assert_array_equal(x, y, err_msg=where)

    jax.tree_util.tree_map_with_path(check, a, b)
