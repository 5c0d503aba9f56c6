"""The baselines the papers compare against, on whole models and without calibration data:
round-to-nearest (GPTQ's RTN: every weight onto the same min-max grid GPTQ uses) and magnitude
pruning (SparseGPT's: the smallest |w| of each Linear, or of each group of M inputs for N:M).

Both leave embeddings, project_in/out, LayerNorms and biases as they are, as the methods do.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from opt_jax import param_tree
from opt_jax.compress import formats, grid
from opt_jax.compress.calibrate import check_float
from opt_jax.compress.sparsegpt import check_sparsity


def round_to_nearest(config, params, bits: int = 4, group_size: int = -1):
    """(qconfig, qparams): every decoder Linear rounded to nearest on the asymmetric min-max
    grid of its row (group_size -1) or of each row's groups, stored in the `gptq` format."""
    check_float(config)
    grid.check_bits(bits)
    for width in (config.hidden_size, config.ffn_dim):
        grid.check_group_size(group_size, width)

    def quantize(path, fields):
        W = formats.to_matrix(fields["kernel"], path)
        Q, scale, zero = formats.rtn_grid(W, bits, group_size)
        return {**fields, **formats.grid_params(Q, scale, zero, bits, group_size,
                                                fields["kernel"], path)}  # fmt: skip

    qconfig = config.replace(quantization="gptq", quant_bits=bits, quant_group_size=group_size)
    return qconfig, map_linears(config, params, quantize)


def magnitude_prune(config, params, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0):
    """(config, params) with the smallest-magnitude weights of every decoder Linear set to 0:
    unstructured, all |w| <= the `sparsity` quantile of the whole matrix (the reference's
    `--gmp`, an inclusive threshold); N:M, the N smallest |w| of every M consecutive inputs."""
    check_float(config)
    for width in (config.hidden_size, config.ffn_dim):
        check_sparsity(sparsity, prune_n, prune_m, width, prune_m or 1)

    def prune(path, fields):
        W = formats.to_matrix(fields["kernel"], path)
        magnitude = np.abs(W)
        if prune_n:
            windows = magnitude.reshape(W.shape[0], -1, prune_m)
            smallest = np.argsort(windows, axis=-1, kind="stable")[..., :prune_n]
            mask = np.zeros(windows.shape, bool)
            np.put_along_axis(mask, smallest, True, axis=-1)
            mask = mask.reshape(W.shape)
        else:
            threshold = np.sort(magnitude.ravel())[int(magnitude.size * sparsity)]
            mask = magnitude <= threshold
        pruned = np.where(mask, 0, W)
        return {**fields, "kernel": formats.from_matrix(pruned, fields["kernel"])}

    return config, map_linears(config, params, prune)


def map_linears(config, params, fn) -> dict:
    """params with each decoder layer's Linears replaced by fn(path in the layer, its params)."""
    params = nn.unbox(params)
    if config.scan_layers:
        params = param_tree.unstack_layers(params)
    params = jax.tree.map(lambda x: x, params)
    decoder = param_tree.decoder_of(params)
    for i in range(config.num_hidden_layers):
        layer = decoder[f"layers_{i}"]
        new = {path: fn(path, fields) for path, fields in formats.linears(layer).items()}
        decoder[f"layers_{i}"] = jax.tree.map(jnp.asarray, formats.replace_linears(layer, new))
    if config.scan_layers:
        params = param_tree.stack_layers(params, config.num_hidden_layers)
    return params
