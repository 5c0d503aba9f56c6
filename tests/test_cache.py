"""The explicit KV cache: prefill + one-token steps (and chunked prefill) == one full forward,
and == transformers' own KV cache (past_key_values) fed the same pieces."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_diff, ragged_batch, random_tiny_model

import opt_jax

TOL = 1e-4


def _model(variant_kwargs=None):
    return random_tiny_model(**(variant_kwargs or {}))


def _run_in_chunks(model, params, config, ids, mask, chunks, max_length):
    cache = opt_jax.KVCache.init(config, ids.shape[0], max_length)
    pieces, start = [], 0
    for size in chunks:
        out = model.apply(
            {"params": params},
            ids[:, start : start + size],
            attention_mask=mask[:, start : start + size],
            cache=cache,
        )
        cache = out.cache
        pieces.append(out.logits)
        start += size
    return jnp.concatenate(pieces, axis=1), cache


@pytest.mark.parametrize(
    "variant",
    [{}, dict(do_layer_norm_before=False, word_embed_proj_dim=8), dict(scan_layers=True),
     dict(attention_impl="dot_product")],
    ids=["pre_ln", "post_ln", "scan", "dot_product"],
)  # fmt: skip
@pytest.mark.parametrize(
    "chunks", [[6, 1, 1, 1, 1, 1], [3, 3, 3, 2], [11]], ids=["prefill+steps", "chunked", "one"]
)
def test_cache_matches_full_forward(variant, chunks):
    config, model, params = _model(variant)
    ids, mask = ragged_batch()
    full = model.apply({"params": params}, ids, attention_mask=mask).logits
    stepped, cache = _run_in_chunks(model, params, config, ids, mask, chunks, max_length=16)
    real = mask == 1
    scale = np.abs(np.asarray(full)[real]).max()
    assert np.abs(np.asarray(stepped - full)[real]).max() <= TOL * scale
    np.testing.assert_array_equal(cache.index, [11, 11, 11])
    np.testing.assert_array_equal(cache.position, mask.sum(1))
    np.testing.assert_array_equal(cache.slot_mask[:, :11], real)
    assert not cache.slot_mask[:, 11:].any()


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_project"])
def test_cache_steps_equal_transformers_incremental_decoding(hf_dir, variant):
    """An independent reference: a left-padded ragged prompt prefilled 6 tokens at once, then one
    token at a time, then 3 new tokens (decode steps continue each row's positions after its
    padding); transformers' OPT gets the same pieces with its past_key_values and the attention
    mask so far (its positions come from that mask)."""
    import inspect

    import torch

    hf, directory = hf_dir(variant)
    config, params = opt_jax.load_pretrained(directory)
    model = opt_jax.OPTForCausalLM(config)
    ids, mask = ragged_batch()
    ids = np.concatenate([ids, [[5, 6, 7]] * 3], 1)
    mask = np.concatenate([mask, np.ones((3, 3), mask.dtype)], 1)
    chunks = [6] + [1] * 8
    ours, cache = _run_in_chunks(model, params, config, ids, mask, chunks, max_length=16)
    # past_key_values, renamed `cache` in later transformers 5 releases
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    theirs, past, start = [], None, 0
    with torch.no_grad():
        for size in chunks:
            out = hf(input_ids=torch.tensor(ids[:, start : start + size]),
                     attention_mask=torch.tensor(mask[:, : start + size]),
                     use_cache=True, **{name: past})  # fmt: skip
            past, start = getattr(out, name), start + size
            theirs.append(out.logits.numpy())
    real = mask == 1
    assert max_rel_diff(ours, np.concatenate(theirs, 1), real) <= 1e-5  # measured 3.5e-7
    np.testing.assert_array_equal(cache.position, mask.sum(1))


def test_cache_capacity_checks():
    config, model, params = _model()
    with pytest.raises(ValueError, match="max_length 41 exceeds max_position_embeddings 40"):
        opt_jax.KVCache.init(config, 1, 41)
    cache = opt_jax.KVCache.init(config, 2, 4)
    with pytest.raises(ValueError, match="5 new tokens do not fit a cache of 4 slots"):
        model.apply({"params": params}, np.ones((2, 5), np.int32), cache=cache)
    with pytest.raises(ValueError, match="cache batch size 2 != input batch size 3"):
        model.apply({"params": params}, np.ones((3, 2), np.int32), cache=cache)
