"""A keyed permutation of [0, n) computed index by index: the shuffle of an epoch without an
array of all n indices (levanter's permutations are built the same way).

A 4-round Feistel network permutes the 2h-bit integers (4^h >= n); "cycle walking" applies it
again to any value >= n until it lands in [0, n), which keeps it a bijection of [0, n) (the
walk from x < n stays on x's cycle, which returns below n). The expected number of walks is
below 4, whatever n.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def round_keys(*key: int) -> np.ndarray:
    """ROUNDS uint64 keys from integers (e.g. seed, source, epoch)."""
    return np.random.SeedSequence([int(k) for k in key]).generate_state(ROUNDS, np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing map of uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
    mask = np.uint64((1 << half) - 1)
    left, right = x >> np.uint64(half), x & mask
    for key in keys:
        left, right = right, left ^ (_mix(right ^ key) & mask)
    return (left << np.uint64(half)) | right


def permute(index, n: int, keys: np.ndarray) -> np.ndarray:
    """The images of `index` (int array, values in [0, n)) under the permutation of [0, n)
    that `keys` (from round_keys) selects. int64, index's shape."""
    index = np.asarray(index, np.int64)
    if n < 1:
        raise ValueError(f"cannot permute an empty range (n={n})")
    if index.size and (index.min() < 0 or index.max() >= n):
        raise IndexError(f"indices must lie in [0, {n})")
    if n == 1:
        return np.zeros_like(index)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    out = _feistel(index.astype(np.uint64).ravel(), half, keys)
    outside = out >= np.uint64(n)
    while outside.any():  # cycle walking
        out[outside] = _feistel(out[outside], half, keys)
        outside = out >= np.uint64(n)
    return out.astype(np.int64).reshape(index.shape)
