"""SparseGPT (Frantar & Alistarh 2023): prune a Linear layer to a given sparsity, the pruned
weights' error compensated by the weights not fixed yet, with GPTQ's Hessian machinery.

`sparsegpt_layer` is the reference `SparseGPT.fasterprune` of IST-DASLab/sparsegpt (with or
without its joint quantisation), checked against a float64 transcription of it in
tests/test_compress.py:
  - unstructured: at the start of each block of `block_size` columns, the weights with the
    smallest w^2 / diag(U)^2 (U: the upper Cholesky factor of H^-1, see hessian.py) are
    masked; the reference's threshold is inclusive, so a block of n weights loses
    floor(n * sparsity) + 1 of them (more only on exact ties);
  - N:M (e.g. 2:4): every M consecutive columns of each row lose the N with the smallest
    score, chosen when the walk reaches them (on the weights as updated so far);
  - with `bits`, each column is also rounded onto its row's min-max grid (fitted to the original
    row, as the reference's quantizer) after pruning; 0 lies on every grid, so pruned weights
    stay exactly 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from opt_jax.compress import calibrate, formats, grid, hessian


def check_sparsity(sparsity, prune_n: int, prune_m: int, columns: int, block_size: int) -> None:
    if (prune_n, prune_m) != (0, 0):
        if not (0 < prune_n < prune_m):
            raise ValueError(
                f"N:M sparsity needs 0 < prune_n < prune_m, got prune_n={prune_n}, "
                f"prune_m={prune_m}"
            )
        if columns % prune_m or block_size % prune_m:
            raise ValueError(
                f"prune_m={prune_m} must divide the input width {columns} and block_size "
                f"{block_size}"
            )
        return
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity!r}")


def sparsegpt_layer(W, H, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0,
                    damp: float = 0.01, block_size: int = 128,
                    bits: int | None = None):  # fmt: skip
    """SparseGPT-pruned weights of one Linear layer.

    Args:
      W: [out, in] float weights (a row per output); H: [in, in] Hessian 2 X X^T / n.
      sparsity: fraction of each block's weights to prune (unstructured; ignored for N:M).
      prune_n, prune_m: N:M sparsity (N of every M consecutive inputs pruned per row); 0, 0
        for unstructured.
      damp, block_size: as gptq_layer.
      bits: None, or also quantise (the paper's joint sparsity + quantisation) onto a per-row
        asymmetric grid of 2^bits levels.

    Returns:
      [out, in] pruned and error-compensated weights, in W's dtype (pruned entries exactly 0).
    """
    hessian.check_layer(W, H, block_size, damp)
    check_sparsity(sparsity, prune_n, prune_m, np.shape(W)[1], block_size)
    if bits is not None:
        grid.check_bits(bits)
    W = jnp.asarray(W)
    dtype = W.dtype
    work = jnp.promote_types(dtype, jnp.float32)
    out = _sparsegpt(W.astype(work), jnp.asarray(H, work), float(sparsity), int(prune_n),
                     int(prune_m), float(damp), int(block_size), bits)[0]  # fmt: skip
    hessian.check_finite(out, damp, "sparsegpt_layer")
    return out.astype(dtype)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _sparsegpt(W, H, sparsity, prune_n, prune_m, damp, block_size, bits):
    """(pruned W, the per-row grid (scale, zero) [rows, 1] each, or None without bits)."""
    columns = W.shape[1]
    row_grid = grid.fit(W, bits) if bits is not None else None  # before dead columns: reference
    W, H, _ = hessian.prepare(W, H, damp)
    Hinv = hessian.inverse_cholesky(H)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, Hinv1 = W[:, i1:i2], Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            score = W1**2 / jnp.diag(Hinv1)[None, :] ** 2
            threshold = jnp.sort(score.ravel())[int(score.size * sparsity)]
            mask = score <= threshold
        else:
            mask = jnp.zeros(W1.shape, bool)
        Q1, err = _prune_block(W1, Hinv1, mask, prune_n, prune_m, row_grid, bits)
        W = W.at[:, i1:i2].set(Q1)
        W = W.at[:, i2:].add(-err @ Hinv[i1:i2, i2:])
    return W, row_grid


def _prune_block(W1, Hinv1, mask, prune_n, prune_m, row_grid, bits):
    """Prunes the columns of one block in order (N:M groups chosen as the walk reaches them).

    Returns:
      (pruned block, the scaled errors [rows, count] for the lazy update of later blocks)
    """
    diag = jnp.diag(Hinv1)

    def column(i, carry):
        W1, mask, Q1, err1 = carry
        if prune_n:

            def choose(mask):
                window = jax.lax.dynamic_slice_in_dim(W1, i, prune_m, axis=1)
                d = jax.lax.dynamic_slice_in_dim(diag, i, prune_m)
                smallest = jax.lax.top_k(-(window**2) / d[None, :] ** 2, prune_n)[1]
                chosen = (
                    jnp.zeros(window.shape, bool)
                    .at[jnp.arange(window.shape[0])[:, None], smallest]
                    .set(True)
                )
                return jax.lax.dynamic_update_slice_in_dim(mask, chosen, i, axis=1)

            mask = jax.lax.cond(i % prune_m == 0, choose, lambda m: m, mask)
        w = W1[:, i]
        q = jnp.where(mask[:, i], 0, w)
        if row_grid is not None:
            q = grid.quantize(q, row_grid[0][:, 0], row_grid[1][:, 0], bits)
        W1, err = hessian.propagate(W1, Hinv1, i, q)
        return W1, mask, Q1.at[:, i].set(q), err1.at[:, i].set(err)

    zeros = jnp.zeros_like(W1)
    _, _, Q1, err1 = jax.lax.fori_loop(0, W1.shape[1], column, (W1, mask, zeros, zeros))
    return Q1, err1


def sparsegpt(config, params, calibration_ids, sparsity: float = 0.5, *, prune_n: int = 0,
              prune_m: int = 0, bits: int | None = None, damp: float = 0.01,
              block_size: int = 128, batch_size: int = 8, mesh=None, on_layer=None):  # fmt: skip
    """A whole model pruned with SparseGPT layer by layer on calibration sequences (the
    reference's `opt_sequential`, see opt_jax/compress/calibrate.py).

    Args:
      config, params: a float model; calibration_ids: int [N, T] token sequences.
      sparsity, prune_n, prune_m, damp, block_size: as sparsegpt_layer.
      bits: None keeps float weights (with zeros); 2-8 also quantises them (the paper's joint
        sparsity + quantisation), stored in the `gptq` format with one grid per row.
      batch_size, mesh, on_layer: as opt_jax.compress.gptq.

    Returns:
      (config, params): the same config and float params with the pruned weights exactly 0,
      or with `bits` a `gptq`-quantised config and params.
    """
    calibrate.check_calibration(config, calibration_ids)
    for width in (config.hidden_size, config.ffn_dim):
        check_sparsity(sparsity, prune_n, prune_m, width, block_size)
    hessian.check_options(block_size, damp)
    if bits is not None:
        grid.check_bits(bits)
    options = (float(sparsity), int(prune_n), int(prune_m), float(damp), int(block_size), bits)

    def compress_layer(index, layer, stats):
        computes, stored = {}, {}
        for path, fields in formats.linears(layer).items():
            W = formats.to_matrix(fields["kernel"], path)
            H = stats.hessian[calibrate.INPUT_OF[path[-1]]]
            Q, row_grid = _sparsegpt(jnp.asarray(W), H, *options)
            hessian.check_finite(Q, damp, f"sparsegpt: layer {index} {'/'.join(path)}")
            computes[path] = {**fields, "kernel": formats.from_matrix(Q, fields["kernel"])}
            stored[path] = computes[path]
            if bits is not None:
                scale, zero = (np.broadcast_to(np.asarray(a), W.shape) for a in row_grid)
                stored[path] = {
                    **fields,
                    **formats.grid_params(Q, scale, zero, bits, -1, fields["kernel"], path),
                }
        return (formats.replace_linears(layer, computes), formats.replace_linears(layer, stored))

    out = calibrate.walk(config, params, calibration_ids, compress_layer,
                         batch_size=batch_size, mesh=mesh, on_layer=on_layer)  # fmt: skip
    if bits is not None:
        config = config.replace(quantization="gptq", quant_bits=bits, quant_group_size=-1)
    return config, out
