"""GPTQ and SparseGPT layer steps against float64 transcriptions of the reference code
(compress_reference.py), what they promise beyond it (grids, exact sparsity patterns, lower
output error than round-to-nearest and magnitude pruning), and their errors."""

import jax
import numpy as np
import pytest
from compress_reference import add_batch, fasterprune, fasterquant

from opt_jax import compress
from opt_jax.compress import hessian

OUT, IN = 24, 64


def _layer(seed=0, dead=()):
    """W [OUT, IN] and H = 2 X X^T / n of correlated inputs X (a few strong directions, as
    activations have), with `dead` inputs never active."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(OUT, IN))
    X = rng.normal(size=(IN, 256)) * rng.uniform(0.2, 3, size=(IN, 1))
    X += 0.5 * rng.normal(size=(IN, 4)) @ rng.normal(size=(4, 256))
    X[list(dead)] = 0
    return W, 2 * X @ X.T / X.shape[1], X


def _rel(a, b):
    return np.abs(np.asarray(a) - b).max() / np.abs(b).max()


@pytest.mark.parametrize(
    "options",
    [
        dict(bits=4),
        dict(bits=3, block_size=16),  # several lazy-update blocks
        dict(bits=4, group_size=16, block_size=32),  # groups fitted mid-block (stale W)
        dict(bits=2, group_size=32, block_size=16),  # groups spanning blocks
        dict(bits=4, group_size=16, act_order=True, block_size=32),
        dict(bits=3, group_size=16, act_order=True, static_groups=True, block_size=32),
        dict(bits=8, damp=0.1),
    ],
    ids=str,
)
def test_gptq_layer_equals_the_reference_algorithm(options):
    W, H, _ = _layer(dead=(5,))
    reference = fasterquant(
        W, H, options["bits"], groupsize=options.get("group_size", -1),
        actorder=options.get("act_order", False),
        static_groups=options.get("static_groups", False),
        blocksize=options.get("block_size", 128), percdamp=options.get("damp", 0.01),
    )  # fmt: skip
    with jax.enable_x64(True):
        ours = np.asarray(compress.gptq_layer(W, H, **options))
    assert ours.dtype == np.float64
    assert _rel(ours, reference) <= 1e-5
    assert (ours[:, 5] == 0).all()  # a dead input's column is zeroed


@pytest.mark.parametrize(
    "options",
    [dict(sparsity=0.5), dict(sparsity=0.7, block_size=16), dict(prune_n=2, prune_m=4),
     dict(prune_n=1, prune_m=4, block_size=32), dict(sparsity=0.5, bits=4),
     dict(prune_n=2, prune_m=4, bits=3, block_size=32)],
    ids=str,
)  # fmt: skip
def test_sparsegpt_layer_equals_the_reference_algorithm(options):
    W, H, _ = _layer(seed=1, dead=(7,))
    reference = fasterprune(
        W, H, options.get("sparsity", 0.5), prunen=options.get("prune_n", 0),
        prunem=options.get("prune_m", 0), blocksize=options.get("block_size", 128),
        wbits=options.get("bits"),
    )  # fmt: skip
    with jax.enable_x64(True):
        ours = np.asarray(compress.sparsegpt_layer(W, H, **options))
    np.testing.assert_array_equal(ours == 0, reference == 0)  # the same weights pruned
    assert _rel(ours, reference) <= 1e-5


def test_sparsity_patterns_are_what_was_asked():
    W, H, _ = _layer(seed=2)
    two_four = np.asarray(compress.sparsegpt_layer(W, H, prune_n=2, prune_m=4))
    assert ((two_four.reshape(OUT, IN // 4, 4) == 0).sum(-1) == 2).all()  # exactly 2 of 4
    half = np.asarray(compress.sparsegpt_layer(W, H, sparsity=0.5, block_size=32))
    # Per block of OUT x 32 weights, the reference's inclusive threshold prunes floor(n s) + 1.
    per_block = (half.reshape(OUT, 2, 32) == 0).sum(axis=(0, 2))
    assert per_block.tolist() == [OUT * 16 + 1] * 2


def test_gptq_lies_on_its_grid_and_beats_round_to_nearest():
    """Each row's values are on its min-max grid (at most 2^bits levels), and the layer's output
    error on the calibration inputs is lower than RTN's: what GPTQ is for."""
    W, H, X = _layer(seed=3)
    for bits, group in ((4, -1), (3, -1), (3, 16)):
        ours = np.asarray(compress.gptq_layer(W.astype(np.float32), H, bits=bits,
                                              group_size=group))  # fmt: skip
        rtn = np.asarray(compress.rtn(W, bits, group))
        span = IN if group == -1 else group
        levels = [len(np.unique(np.round(g, 5))) for g in ours.reshape(-1, span)]
        assert max(levels) <= 2**bits
        gptq_error = np.linalg.norm((W - ours) @ X)
        rtn_error = np.linalg.norm((W - rtn) @ X)
        assert gptq_error < 0.9 * rtn_error, (bits, group, gptq_error, rtn_error)  # ~0.84


def test_sparsegpt_beats_magnitude_pruning():
    W, H, X = _layer(seed=4)
    ours = np.asarray(compress.sparsegpt_layer(W.astype(np.float32), H, sparsity=0.5))
    keep = np.abs(W) > np.quantile(np.abs(W), 0.5)
    assert np.linalg.norm((W - ours) @ X) < 0.8 * np.linalg.norm((W - W * keep) @ X)  # ~0.7


def test_half_precision_weights_come_back_in_their_dtype():
    W, H, _ = _layer()
    out = compress.gptq_layer(W.astype(np.float16), H.astype(np.float32), bits=4)
    assert out.dtype == np.float16 and np.isfinite(np.asarray(out, np.float32)).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda W, H: compress.gptq_layer(W, H, bits=1), r"bits must be an integer in \[2, 8\]"),
        (lambda W, H: compress.gptq_layer(W, H, bits=9), r"bits must be an integer in \[2, 8\]"),
        (lambda W, H: compress.gptq_layer(W, H, group_size=48),
         "group_size must be -1 or a positive divisor of the input width 64, got 48"),
        (lambda W, H: compress.gptq_layer(W, H[:10, :10]), r"H must be \[in, in\] = \[64, 64\]"),
        (lambda W, H: compress.gptq_layer(W[0], H), "W must be a 2-D"),
        (lambda W, H: compress.gptq_layer(W, H, block_size=0), "block_size must be a positive"),
        (lambda W, H: compress.gptq_layer(W, H, damp=0), "damp must be > 0"),
        (lambda W, H: compress.gptq_layer(W, -H), "not positive definite"),
        (lambda W, H: compress.sparsegpt_layer(W, H, sparsity=1.0),
         r"sparsity must be in \(0, 1\)"),
        (lambda W, H: compress.sparsegpt_layer(W, H, prune_n=4, prune_m=4),
         "N:M sparsity needs 0 < prune_n < prune_m"),
        (lambda W, H: compress.sparsegpt_layer(W, H, prune_n=2, prune_m=3),
         "prune_m=3 must divide the input width 64"),
        (lambda W, H: compress.rtn(W, 4, 7), "group_size must be -1 or a positive divisor"),
    ],
)  # fmt: skip
def test_bad_arguments_fail_before_any_work(call, message):
    W, H, _ = _layer()
    with pytest.raises(ValueError, match=message):
        call(W.astype(np.float32), H.astype(np.float32))


def test_hessian_accumulates_over_batches_and_its_scale_does_not_matter():
    rng = np.random.default_rng(5)
    batches = [rng.normal(size=(2, 16, IN)) for _ in range(3)]  # [sequences, tokens, in]
    H, count = np.zeros((IN, IN), np.float32), 0
    ref, nsamples = np.zeros((IN, IN)), 0
    for x in batches:
        H, count = hessian.accumulate(H, count, x)
        ref, nsamples = add_batch(ref, nsamples, x)
    X = np.concatenate([x.reshape(-1, IN) for x in batches]).T  # [in, 96 tokens]
    assert count == 96
    np.testing.assert_allclose(H, 2 * X @ X.T / 96, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ref, 16 * (2 * X @ X.T / 96), rtol=1e-6)  # per sequence: T x
    W = rng.normal(size=(OUT, IN))
    with jax.enable_x64(True):
        exact = 2 * X @ X.T / 96
        for layer in (lambda h: compress.gptq_layer(W, h, bits=3),
                      lambda h: compress.sparsegpt_layer(W, h, sparsity=0.5)):  # fmt: skip
            np.testing.assert_allclose(layer(exact), layer(16 * exact), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="inputs have 8 features; the Hessian is 64 x 64"):
        hessian.accumulate(H, count, np.zeros((4, 8)))
