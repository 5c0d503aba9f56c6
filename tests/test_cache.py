"""The explicit KV cache: prefill + one-token steps (and chunked prefill) == one full forward."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ragged_batch, random_tiny_model

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


def test_decode_steps_continue_positions_per_row():
    """After a left-padded prefill, one-token steps match the unpadded full forward of each row."""
    config, model, params = _model()
    ids, mask = ragged_batch()
    _, cache = _run_in_chunks(model, params, config, ids, mask, [11], max_length=14)
    new = np.array([[5, 6, 7]] * 3)
    for t in range(3):
        out = model.apply({"params": params}, new[:, t : t + 1], cache=cache)
        cache = out.cache
        for row in range(3):
            seq = np.concatenate([ids[row][mask[row] == 1], new[row, : t + 1]])[None]
            alone = model.apply({"params": params}, seq).logits[0, -1]
            np.testing.assert_allclose(out.logits[row, 0], alone, atol=1e-5, rtol=0)


def test_cache_capacity_checks():
    config, model, params = _model()
    with pytest.raises(ValueError, match="max_length 41 exceeds max_position_embeddings 40"):
        opt_jax.KVCache.init(config, 1, 41)
    cache = opt_jax.KVCache.init(config, 2, 4)
    with pytest.raises(ValueError, match="5 new tokens do not fit a cache of 4 slots"):
        model.apply({"params": params}, np.ones((2, 5), np.int32), cache=cache)
    with pytest.raises(ValueError, match="cache batch size 2 != input batch size 3"):
        model.apply({"params": params}, np.ones((3, 2), np.int32), cache=cache)
