"""Interventions (opt_jax.interventions): each checks a property that fails if the mechanism is
wrong: patching a run with its own activations changes nothing, patching B with A's residual
stream gives A's logits, the logit lens of the last layer is the model's logits, ablations do
what they say."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ragged_batch, random_tiny_model

from opt_jax import interventions as iv
from opt_jax.param_tree import stack_layers

CONFIG, MODEL, PARAMS = random_tiny_model(init_std=0.3, noise_seed=3, dropout=0.0)
POST_LN = random_tiny_model(
    init_std=0.3, noise_seed=4, dropout=0.0, do_layer_norm_before=False, word_embed_proj_dim=8
)
IDS, MASK = ragged_batch()
L = CONFIG.num_hidden_layers


def test_capture_shapes_and_agreement_with_hidden_states():
    names = [f"layers_1.{site}" for site in iv.SITES]
    out, acts = iv.capture(MODEL, PARAMS, IDS, MASK, names=names)
    plain = MODEL.apply({"params": PARAMS}, IDS, MASK, output_hidden_states=True)
    np.testing.assert_array_equal(out.logits, plain.logits)  # capturing changes nothing
    b, t, d = 3, 11, CONFIG.hidden_size
    n, h, f = CONFIG.num_attention_heads, CONFIG.head_dim, CONFIG.ffn_dim
    shapes = {"attn_input": (b, t, d), "q": (b, t, n, h), "k": (b, t, n, h), "v": (b, t, n, h),
              "head_outputs": (b, t, n, h), "attn_output": (b, t, d), "mlp_hidden": (b, t, f),
              "mlp_output": (b, t, d), "residual": (b, t, d)}  # fmt: skip
    for site, shape in shapes.items():
        assert acts[f"layers_1.{site}"].shape == shape, site
    # Layer 0's residual stream is hidden_states[1] (transformers' second entry).
    _, first = iv.capture(MODEL, PARAMS, IDS, MASK, names=["layers_0.residual"])
    np.testing.assert_array_equal(first["layers_0.residual"], plain.hidden_states[1])


@pytest.mark.parametrize("model, params", [(MODEL, PARAMS), POST_LN[1:]], ids=["pre", "post"])
def test_patching_own_activations_changes_nothing(model, params):
    names = [f"layers_{i}.{s}" for i in range(L) for s in ("q", "head_outputs", "residual")]
    out, acts = iv.capture(model, params, IDS, MASK, names=names)
    patched = iv.patch(model, params, IDS, MASK, {n: (a, None) for n, a in acts.items()})
    np.testing.assert_array_equal(patched.logits, out.logits)


def test_patching_a_residual_stream_from_another_run():
    other = np.random.RandomState(5).randint(3, CONFIG.vocab_size, IDS.shape)
    a, acts = iv.capture(MODEL, PARAMS, other, MASK, names=[f"layers_{L - 1}.residual"])
    b = MODEL.apply({"params": PARAMS}, IDS, MASK)
    # Everything from run A at the last layer: B becomes A.
    whole = iv.patch(
        MODEL,
        PARAMS,
        IDS,
        MASK,
        {f"layers_{L - 1}.residual": (acts[f"layers_{L - 1}.residual"], None)},
    )
    np.testing.assert_allclose(whole.logits, a.logits, rtol=1e-6, atol=1e-6)
    # Only position 7: B's logits there become A's, the others stay B's.
    one = iv.patch(
        MODEL,
        PARAMS,
        IDS,
        MASK,
        {f"layers_{L - 1}.residual": (acts[f"layers_{L - 1}.residual"], [7])},
    )
    np.testing.assert_allclose(one.logits[:, 7], a.logits[:, 7], rtol=1e-6, atol=1e-6)
    keep = np.arange(11) != 7
    np.testing.assert_array_equal(one.logits[:, keep], b.logits[:, keep])
    # Patching an early layer changes what follows.
    _, early = iv.capture(MODEL, PARAMS, other, MASK, names=["layers_0.residual"])
    moved = iv.patch(
        MODEL, PARAMS, IDS, MASK, {"layers_0.residual": (early["layers_0.residual"], None)}
    )
    np.testing.assert_allclose(moved.logits, a.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model, params", [(MODEL, PARAMS), POST_LN[1:]], ids=["pre", "post"])
def test_logit_lens_of_the_last_layer_is_the_model(model, params):
    lens = iv.logit_lens(model, params, IDS, MASK)
    assert lens.shape == (L, 3, 11, CONFIG.vocab_size)
    logits = model.apply({"params": params}, IDS, MASK).logits
    np.testing.assert_allclose(lens[-1], logits, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(lens[0] - lens[-1]).max()) > 1e-3  # earlier layers differ


def test_scan_layers_models_are_run_per_layer():
    scanned = CONFIG.replace(scan_layers=True)
    model = type(MODEL)(scanned)
    params = stack_layers(PARAMS, L)
    lens = iv.logit_lens(model, params, IDS, MASK)
    np.testing.assert_allclose(lens, iv.logit_lens(MODEL, PARAMS, IDS, MASK), rtol=1e-6, atol=1e-6)


def test_head_ablation_zero_and_mean():
    heads = [(0, 1), (1, 2)]
    zero = iv.ablate_heads(MODEL, PARAMS, IDS, MASK, heads, mode="zero")
    # Zero ablation via head_mask == the head's output patched to zeros.
    _, acts = iv.capture(MODEL, PARAMS, IDS, MASK, names=["layers_0.head_outputs"])
    zeros = acts["layers_0.head_outputs"].at[:, :, 1].set(0.0)
    one_layer = iv.ablate_heads(MODEL, PARAMS, IDS, MASK, [(0, 1)], mode="zero")
    patched = iv.patch(MODEL, PARAMS, IDS, MASK, {"layers_0.head_outputs": (zeros, None)})
    np.testing.assert_allclose(one_layer.logits, patched.logits, rtol=1e-5, atol=1e-5)
    plain = MODEL.apply({"params": PARAMS}, IDS, MASK)
    assert float(jnp.abs(zero.logits - plain.logits).max()) > 1e-3
    # Mean ablation: under it, the ablated head's output is its mean over real tokens
    # everywhere, and the other heads of that layer are untouched.
    mean = iv.ablate_heads(MODEL, PARAMS, IDS, MASK, [(1, 2)], mode="mean")
    _, ref = iv.capture(MODEL, PARAMS, IDS, MASK, names=["layers_1.head_outputs"])
    expected = np.asarray(ref["layers_1.head_outputs"])[MASK == 1].mean(axis=0)[2]
    assert float(jnp.abs(mean.logits - plain.logits).max()) > 1e-4
    # Re-running the mean ablation and reading the head's output shows the mean everywhere.
    means = np.broadcast_to(expected, (3, 11) + expected.shape)
    value = ref["layers_1.head_outputs"].at[:, :, 2].set(means)
    again = iv.patch(MODEL, PARAMS, IDS, MASK, {"layers_1.head_outputs": (value, None)})
    np.testing.assert_allclose(again.logits, mean.logits, rtol=1e-5, atol=1e-5)


def test_bad_sites_and_heads_are_named():
    with pytest.raises(ValueError, match="unknown site 'layers_0.attn'"):
        iv.capture(MODEL, PARAMS, IDS, MASK, names=["layers_0.attn"])
    with pytest.raises(ValueError, match=r"layers_9.q: the model has layers 0 .. 1"):
        iv.capture(MODEL, PARAMS, IDS, MASK, names=["layers_9.q"])
    with pytest.raises(ValueError, match=r"head \(0, 9\) is outside"):
        iv.ablate_heads(MODEL, PARAMS, IDS, MASK, [(0, 9)])
    with pytest.raises(ValueError, match=r"patch layers_0.residual: value shape \(1, 2\)"):
        iv.patch(MODEL, PARAMS, IDS, MASK, {"layers_0.residual": (np.zeros((1, 2)), None)})
