"""The second-order machinery GPTQ and SparseGPT share.

Both methods compress one Linear layer W [out, in] (PyTorch's layout: a row per output) so that
its outputs on calibration inputs X [in, n] change least: they minimise ||W X - W_hat X||^2, whose
Hessian in each row is H = 2 X X^T / n [in, in]. Both walk the columns left to right, fix
column j, and spread its error over the columns not fixed yet with row j of the upper Cholesky
factor of H^-1 (Frantar et al. 2022, "GPTQ", section 3, steps 2-3; the reference is
IST-DASLab/gptq, `GPTQ.fasterquant`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def accumulate(H, count: int, inputs):
    """Adds a batch of a layer's inputs to its Hessian statistics: H stays the running
    2 X X^T / n over the n tokens seen. (The reference's `add_batch` counts sequences, not
    tokens, so its H is T times this for T-token sequences; GPTQ and SparseGPT do not depend on
    H's scale, as its damping is relative: tests/test_compress.py checks both agree.)

    Args:
      H: [in, in] float32 statistics so far (zeros to start); count: tokens they cover.
      inputs: [..., in] the layer's inputs for this batch (every leading axis is tokens).

    Returns:
      (H, count) over the tokens so far and these.
    """
    x = jnp.asarray(inputs, jnp.float32).reshape(-1, np.shape(inputs)[-1])
    if x.shape[1] != np.shape(H)[0]:
        raise ValueError(
            f"inputs have {x.shape[1]} features; the Hessian is {np.shape(H)[0]} x {np.shape(H)[0]}"
        )
    total = count + x.shape[0]
    return H * (count / total) + (2.0 / total) * (x.T @ x), total


def check_layer(W, H, block_size: int, damp: float) -> None:
    """One-line errors for a layer step's inputs, before any work."""
    if np.ndim(W) != 2:
        raise ValueError(f"W must be a 2-D [out, in] weight, got shape {np.shape(W)}")
    columns = np.shape(W)[1]
    if np.shape(H) != (columns, columns):
        raise ValueError(
            f"H must be [in, in] = [{columns}, {columns}] for W of shape {np.shape(W)}, "
            f"got {np.shape(H)}"
        )
    check_options(block_size, damp)


def check_options(block_size: int, damp: float) -> None:
    if not (isinstance(block_size, int | np.integer) and block_size > 0):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not damp > 0:
        raise ValueError(f"damp must be > 0 (a fraction of mean(diag H)), got {damp!r}")


def prepare(W, H, damp: float):
    """The reference's set-up: dead inputs (diag H == 0, never active in the calibration data)
    get H_jj = 1 and a zero column, then H += damp * mean(diag H) * I.

    Returns:
      (W with dead columns zeroed, damped H, dead [in] bool)
    """
    dead = jnp.diag(H) == 0
    H = H + jnp.diag(dead.astype(H.dtype))  # H_jj = 0 -> 1 on the dead inputs only
    W = jnp.where(dead[None, :], 0, W)
    H = H + damp * jnp.mean(jnp.diag(H)) * jnp.eye(H.shape[0], dtype=H.dtype)
    return W, H, dead


def inverse_cholesky(H):
    """U, the upper Cholesky factor of H^-1 (H^-1 = U^T U), as the reference computes it:
    cholesky(H), its cholesky_inverse, then cholesky(., upper=True). Non-finite if H is not
    positive definite (see `check_finite`)."""
    lower = jnp.linalg.cholesky(H)
    identity = jnp.eye(H.shape[0], dtype=H.dtype)
    inverse = jax.scipy.linalg.cho_solve((lower, True), identity)
    inverse = (inverse + inverse.T) / 2  # symmetric up to rounding; cholesky reads one side
    return jnp.triu(jnp.linalg.cholesky(inverse).T)


def check_finite(result, damp: float, what: str) -> None:
    if not bool(jnp.isfinite(result).all()):  # one scalar to the host, not the weights
        raise ValueError(
            f"{what}: the damped Hessian is not positive definite (its Cholesky factor is not "
            f"finite); raise damp (now {damp}) or use more calibration tokens"
        )


def propagate(W1, Hinv1, i, q):
    """Fixes column i of the block W1 [out, count] to q [out] and spreads its error over the
    block's later columns (Hinv1 is upper triangular: earlier columns get exact zeros).

    Returns:
      (updated W1, err [out] = (w - q) / Hinv1[i, i])
    """
    w = jax.lax.dynamic_index_in_dim(W1, i, axis=1, keepdims=False)
    row = jax.lax.dynamic_index_in_dim(Hinv1, i, axis=0, keepdims=False)
    err = (w - q) / row[i]
    return W1 - err[:, None] * row[None, :], err
