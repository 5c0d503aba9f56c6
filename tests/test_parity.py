"""Logits parity with transformers' PyTorch OPT on every architecture variant and head."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import HEADS, VARIANTS, max_rel_diff, ragged_batch

import opt_jax

TOL = 1e-4  # max |difference| relative to the logits' scale, float32


def _run_both(hf_model, directory, head, ids, mask):
    config, params = opt_jax.load_pretrained(directory)
    assert config.architecture == head
    out = opt_jax.model_for(config).apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)
    )
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out, ref


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_parity_with_transformers(hf_dir, variant, head, side):
    hf_model, directory = hf_dir(variant, head)
    ids, mask = ragged_batch(side=side)
    out, ref = _run_both(hf_model, directory, head, ids, mask)
    # Left padding: compare real positions (HF's padding queries see only masked keys).
    # Right padding: every position, as HF's own integration test does.
    where = (mask == 1) if side == "left" else None
    if head == "OPTForCausalLM":
        assert out.logits.shape == (3, 11, 99)
        assert max_rel_diff(out.logits, ref.logits.numpy(), where) <= TOL
    elif head == "OPTForSequenceClassification":
        assert out.logits.shape == (3, 3)
        assert max_rel_diff(out.logits, ref.logits.numpy()) <= TOL
    else:
        for name in ("start_logits", "end_logits"):
            ours, theirs = getattr(out, name), getattr(ref, name).numpy()
            assert ours.shape == (3, 11)
            assert max_rel_diff(ours, theirs, where) <= TOL


def test_left_padded_rows_match_rows_alone(hf_dir):
    """A batch mixing an unpadded row with a heavily left-padded one gives each its solo logits."""
    _, directory = hf_dir("post_ln_project")
    config, params = opt_jax.load_pretrained(directory)
    model = opt_jax.OPTForCausalLM(config)
    ids, mask = ragged_batch()
    batched = model.apply({"params": params}, ids, attention_mask=mask).logits
    for row in range(ids.shape[0]):
        real = mask[row] == 1
        alone = model.apply({"params": params}, ids[row : row + 1, real]).logits[0]
        np.testing.assert_allclose(batched[row][real], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_project"])
@pytest.mark.parametrize(
    "impl",
    [dict(scan_layers=True), dict(remat_policy="full"), dict(attention_impl="dot_product"),
     dict(scan_layers=True, remat_policy="save_dots", attention_impl="dot_product")],
    ids=["scan", "remat", "dot_product", "all"],
)  # fmt: skip
def test_implementation_options_keep_parity(hf_dir, tmp_path, variant, impl):
    """scan_layers / remat / attention_impl change the implementation, never the numbers."""
    hf_model, directory = hf_dir(variant)
    config, params = opt_jax.load_pretrained(directory, **impl)
    if impl.get("scan_layers"):
        assert params["model"]["decoder"]["layers"]["fc1"]["kernel"].shape[0] == 2
    ids, mask = ragged_batch(side="right")
    out = opt_jax.OPTForCausalLM(config).apply({"params": params}, ids, attention_mask=mask)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert max_rel_diff(out.logits, ref.numpy()) <= TOL
    # Export from this layout is bitwise the original checkpoint.
    opt_jax.save_pretrained(tmp_path / "out", config, params)
    from safetensors.numpy import load_file

    original = load_file(f"{directory}/model.safetensors")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert set(original) == set(exported)
    for key in original:
        np.testing.assert_array_equal(original[key], exported[key])
