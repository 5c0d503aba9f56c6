"""GPTQ (Frantar et al. 2022): quantise a Linear layer column by column, each column's rounding
error compensated by the columns not quantised yet, with the calibration inputs' Hessian.

`gptq_layer` is the reference `GPTQ.fasterquant` of IST-DASLab/gptq (asymmetric per-row grid,
`percdamp` dampening, dead inputs, lazy batch updates in blocks of `block_size` columns,
`actorder` and `static_groups`), checked against a float64 transcription of it in
tests/test_compress.py. It returns the dequantised weights, as the reference leaves
`layer.weight`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from opt_jax.compress import calibrate, formats, grid, hessian


def gptq_layer(W, H, bits: int = 4, group_size: int = -1, act_order: bool = False,
               damp: float = 0.01, block_size: int = 128, static_groups: bool = False):  # fmt: skip
    """GPTQ-quantised weights of one Linear layer.

    Args:
      W: [out, in] float weights (PyTorch's layout: a row per output).
      H: [in, in] float Hessian 2 X X^T / n of the layer's calibration inputs X [in, n].
      bits: grid size 2^bits (2-8), asymmetric min-max per row.
      group_size: -1 for one grid per row (fitted to the whole original row), else a grid per
        row and group of this many consecutive columns, fitted when the walk reaches the group
        (to the weights as updated so far, as the reference does).
      act_order: quantise columns in decreasing diag(H) order (the reference's `actorder`).
      damp: H += damp * mean(diag H) * I before inverting (`percdamp`).
      block_size: columns per lazy batch update (changes rounding only, not the algorithm).
      static_groups: with groups, fit every group's grid up front on the original columns
        (so act_order keeps groups of consecutive columns).

    Returns:
      [out, in] dequantised weights, in W's dtype. Each row's values lie on its grids.

    Raises:
      ValueError: bad bits / group_size / shapes, or a Hessian that is not positive definite.
    """
    hessian.check_layer(W, H, block_size, damp)
    grid.check_bits(bits)
    grid.check_group_size(group_size, np.shape(W)[1])
    W = jnp.asarray(W)
    dtype = W.dtype
    work = jnp.promote_types(dtype, jnp.float32)  # float32, or float64 under jax x64
    out = _gptq(W.astype(work), jnp.asarray(H, work), bits, int(group_size), bool(act_order),
                float(damp), int(block_size), bool(static_groups))[0]  # fmt: skip
    hessian.check_finite(out, damp, "gptq_layer")
    return out.astype(dtype)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _gptq(W, H, bits, group_size, act_order, damp, block_size, static_groups):
    """(Q, scale, zero), all [rows, in] in the original column order: the quantised weights and
    the grid each weight was rounded onto (so the codes are round(Q / scale) + zero)."""
    rows, columns = W.shape
    row_scale, row_zero = grid.fit(W, bits)  # per-row grid of the original weights
    W, H, _ = hessian.prepare(W, H, damp)
    # Per-column grids [rows, in], in walk order, filled in as groups start.
    scale = jnp.broadcast_to(row_scale, W.shape)
    zero = jnp.broadcast_to(row_zero, W.shape)
    perm = jnp.arange(columns)
    if act_order:
        perm = jnp.argsort(-jnp.diag(H), stable=True)
    if static_groups and group_size != -1:
        s, z = grid.fit(W.reshape(rows * columns // group_size, group_size), bits)
        # Group g of the original columns, broadcast to its columns, then permuted.
        scale = jnp.repeat(s.reshape(rows, -1), group_size, axis=1)[:, perm]
        zero = jnp.repeat(z.reshape(rows, -1), group_size, axis=1)[:, perm]
    if act_order:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = hessian.inverse_cholesky(H)
    Q = jnp.zeros_like(W)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        if group_size != -1 and not static_groups:
            # Groups starting in this block are fitted to W as it stands at the block's start
            # (the reference reads W, which the lazy update refreshes only between blocks).
            for start in range(-(-i1 // group_size) * group_size, i2, group_size):
                s, z = grid.fit(W[:, start : start + group_size], bits)
                scale = scale.at[:, start : start + group_size].set(s)
                zero = zero.at[:, start : start + group_size].set(z)
        Q1, err = _quantize_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], scale[:, i1:i2],
                                  zero[:, i1:i2], bits)  # fmt: skip
        Q = Q.at[:, i1:i2].set(Q1)
        W = W.at[:, i2:].add(-err @ Hinv[i1:i2, i2:])
    if act_order:
        inverse = jnp.argsort(perm)
        Q, scale, zero = Q[:, inverse], scale[:, inverse], zero[:, inverse]
    return Q, scale, zero


def _quantize_block(W1, Hinv1, scale, zero, bits):
    """Quantises the columns of one block [rows, count] in order, each with its grid.

    Returns:
      (quantised block, the scaled errors [rows, count] for the lazy update of later blocks)
    """

    def column(i, carry):
        W1, Q1, err1 = carry
        w = W1[:, i]
        q = grid.quantize(w, scale[:, i], zero[:, i], bits)
        W1, err = hessian.propagate(W1, Hinv1, i, q)
        return W1, Q1.at[:, i].set(q), err1.at[:, i].set(err)

    zeros = jnp.zeros_like(W1)
    _, Q1, err1 = jax.lax.fori_loop(0, W1.shape[1], column, (W1, zeros, zeros))
    return Q1, err1


def gptq(config, params, calibration_ids, bits: int = 4, group_size: int = 128, *,
         act_order: bool = False, static_groups: bool = False, damp: float = 0.01,
         block_size: int = 128, batch_size: int = 8, mesh=None, on_layer=None):  # fmt: skip
    """A whole model GPTQ-quantised layer by layer on calibration sequences (the reference's
    `opt_sequential`: opt_jax/compress/calibrate.py).

    Every Linear of every decoder layer is quantised with `gptq_layer` on its inputs' Hessian;
    embeddings, project_in/out, LayerNorms and biases stay as they are.

    Args:
      config, params: a float model (any head, scanned or not).
      calibration_ids: int [N, T] token sequences (the paper: 128 random 2048-token segments).
      bits, group_size, act_order, static_groups, damp, block_size: as gptq_layer (act_order
        with groups needs static_groups=True: the stored format keeps consecutive groups).
      batch_size: calibration sequences per forward pass; mesh: split them over its data axes.
      on_layer: called with (layer index, seconds) after each layer.

    Returns:
      (qconfig, qparams): quantization "gptq" (quant_bits-bit codes with a scale and zero point
      per row and group), running through model_for / generate / scoring / the server.
    """
    calibrate.check_calibration(config, calibration_ids)
    grid.check_bits(bits)
    for width in (config.hidden_size, config.ffn_dim):
        grid.check_group_size(group_size, width)
    hessian.check_options(block_size, damp)
    if act_order and group_size != -1 and not static_groups:
        raise ValueError(
            "act_order with group_size needs static_groups=True: the stored format keeps "
            "groups of consecutive inputs (the reference's --static-groups)"
        )
    qconfig = config.replace(quantization="gptq", quant_bits=bits, quant_group_size=group_size)
    options = (bits, int(group_size), bool(act_order), float(damp), int(block_size),
               bool(static_groups))  # fmt: skip

    def compress_layer(index, layer, stats):
        computes, stored = {}, {}
        for path, fields in formats.linears(layer).items():
            W = formats.to_matrix(fields["kernel"], path)
            H = stats.hessian[calibrate.INPUT_OF[path[-1]]]
            Q, scale, zero = _gptq(jnp.asarray(W), H, *options)
            hessian.check_finite(Q, damp, f"gptq: layer {index} {'/'.join(path)}")
            computes[path] = {**fields, "kernel": formats.from_matrix(Q, fields["kernel"])}
            stored[path] = {
                **fields,
                **formats.grid_params(Q, scale, zero, bits, group_size, fields["kernel"], path),
            }
        return (formats.replace_linears(layer, computes), formats.replace_linears(layer, stored))

    qparams = calibrate.walk(config, params, calibration_ids, compress_layer,
                             batch_size=batch_size, mesh=mesh, on_layer=on_layer)  # fmt: skip
    return qconfig, qparams
