"""The asymmetric min-max integer grid GPTQ's reference uses (its `Quantizer` with sym=False,
perchannel=True): one (scale, zero) per row of the weights it is fitted to, values
scale * (clip(round(w / scale) + zero, 0, 2^bits - 1) - zero). Round-to-nearest (RTN) is this
grid applied to every weight at once."""

from __future__ import annotations

import numbers

import jax.numpy as jnp

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def check_group_size(group_size, columns: int) -> None:
    if group_size != -1 and not (
        isinstance(group_size, numbers.Integral) and 0 < group_size and columns % group_size == 0
    ):
        raise ValueError(
            f"group_size must be -1 or a positive divisor of the input width {columns}, "
            f"got {group_size!r}"
        )


def fit(x, bits: int):
    """(scale [rows, 1], zero [rows, 1]) of the grid for each row of x [rows, n].

    The range always contains 0 (so 0 is exact); an all-zero row gets the range [-1, 1].
    """
    maxq = 2**bits - 1
    low = jnp.minimum(x.min(axis=1), 0)
    high = jnp.maximum(x.max(axis=1), 0)
    empty = (low == 0) & (high == 0)
    low, high = jnp.where(empty, -1, low), jnp.where(empty, 1, high)
    scale = (high - low) / maxq
    zero = jnp.round(-low / scale)
    return scale[:, None], zero[:, None]


def quantize(x, scale, zero, bits: int):
    """x rounded onto the grid (dequantised values, x's shape)."""
    q = jnp.clip(jnp.round(x / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def rtn(W, bits: int, group_size: int = -1):
    """Round-to-nearest: every weight of W [out, in] onto its row's (or row group's) grid."""
    check_bits(bits)
    check_group_size(group_size, W.shape[1])
    if group_size == -1:
        return quantize(W, *fit(W, bits), bits)
    out, columns = W.shape
    groups = W.reshape(out * (columns // group_size), group_size)
    return quantize(groups, *fit(groups, bits), bits).reshape(out, columns)
