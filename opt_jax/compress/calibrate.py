"""Calibration: a model's decoder layers run one at a time over calibration sequences, each
layer's Linear inputs summarised, the layer compressed, and its outputs handed to the next.

This is the papers' `opt_sequential` (IST-DASLab's gptq and sparsegpt `opt.py`): the token
sequences are embedded once, then for layer l
  1. one forward pass with the layer's float weights records the input of each Linear
     (q/k/v share one input, hence one Hessian; out_proj reads the attention output before its
     projection; fc1 the second LayerNorm's output; fc2 the activation of fc1) and reduces it to
     `LayerStatistics`: H = 2 X X^T / n and the per-feature max |x| over all n tokens;
  2. the caller's `compress_layer` turns the float layer and its statistics into a new layer;
  3. the layer's outputs, the next layer's inputs, are computed with the compressed layer
     (`propagate="compressed"`, as GPTQ and SparseGPT do: layer l sees what layers < l, already
     compressed, produce) or with the float one (`propagate="float"`, as SmoothQuant's
     calibration of the float model does).
Memory holds one layer's inputs and outputs [N, T, D] and its statistics, never the whole
model's activations. Embeddings, project_in/out, the final LayerNorm and the head are left as
they are, as the reference leaves them.

Under a `mesh` the calibration batches are split over its data axes: each device reduces its
own tokens and XLA sums the statistics over the data shards (an all-reduce inside the jitted
pass), so H is the same as on one device up to float summation order.

Axis legend: N calibration sequences, T tokens, D hidden size, F ffn size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from opt_jax import param_tree
from opt_jax.config import OPTConfig
from opt_jax.layers import Linear, OPTDecoderLayer
from opt_jax.model import OPTDecoder, positions_and_mask
from opt_jax.parallel import sharding
from opt_jax.validation import validate_token_ids

# A decoder layer's Linears, and the input each one reads (q, k and v read the same one).
LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
INPUT_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "out_proj": "out_proj",
            "fc1": "fc1", "fc2": "fc2"}  # fmt: skip
# The module whose input is recorded for each of those inputs.
_RECORDED = {"qkv": "q_proj", "out_proj": "out_proj", "fc1": "fc1", "fc2": "fc2"}


@dataclasses.dataclass(frozen=True)
class LayerStatistics:
    """One decoder layer's Linear inputs over the n calibration tokens.

    hessian: {"qkv" | "out_proj" | "fc1" | "fc2": [in, in] float32 H = 2 X X^T / n} (empty when
      the walk was asked for no Hessians).
    absmax: {same keys: [in] float32 max over tokens of |x_j|}.
    tokens: n.
    """

    hessian: dict
    absmax: dict
    tokens: int


def check_float(config: OPTConfig) -> None:
    """A one-line ValueError unless `config` is a float model without adapters."""
    if config.lora_rank:
        raise ValueError("the params hold LoRA adapters: merge them first (opt_jax.lora.merge)")
    if config.quantization != "none":
        raise ValueError(
            f"the model is already compressed (quantization={config.quantization!r}): "
            "compress its float checkpoint"
        )


def check_calibration(config: OPTConfig, calibration_ids) -> np.ndarray:
    """The calibration ids as int32 [N, T], or a one-line ValueError before any work: not a
    float model, not [N, T], ids outside the vocabulary, or longer than the positions."""
    check_float(config)
    ids = validate_token_ids(calibration_ids, config.vocab_size, name="calibration_ids")
    if ids.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"calibration sequences of {ids.shape[1]} tokens exceed max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    return ids


def walk(
    config: OPTConfig,
    params,
    calibration_ids,
    compress_layer: Callable[[int, dict, LayerStatistics], tuple[dict, dict]],
    *,
    hessians: bool = True,
    propagate: str = "compressed",
    batch_size: int = 8,
    mesh=None,
    on_layer: Callable[[int, float], None] | None = None,
) -> dict:
    """Compresses every decoder layer in order (see the module docstring).

    Args:
      config: the float model's config; params: its parameters (any head, scanned or not).
      calibration_ids: int [N, T] token sequences (no padding).
      compress_layer: (layer index, float layer params, statistics) -> (the layer's params that
        compute what the compressed layer computes, in float: the next layer's inputs come from
        them; the params to store, in the compressed format).
      hessians: also accumulate H per Linear input (SmoothQuant needs only the maxima).
      propagate: "compressed" or "float": which layer produces the next layer's inputs.
      batch_size: calibration sequences per forward pass.
      mesh: optional device mesh: batches are split over its data axes.
      on_layer: called with (layer index, seconds spent on it) after each layer.

    Returns:
      params with each layer replaced by its stored params, in the input's layout.
    """
    if propagate not in ("compressed", "float"):
        raise ValueError(f"propagate must be 'compressed' or 'float', got {propagate!r}")
    ids = check_calibration(config, calibration_ids)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if mesh is not None and batch_size % sharding.data_parallel_size(mesh):
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of the mesh's data-parallel size "
            f"{sharding.data_parallel_size(mesh)}"
        )
    params = nn.unbox(params)
    if config.scan_layers:
        params = param_tree.unstack_layers(params)
    # One float layer at a time, with the reference attention (fused kernels change nothing).
    layer_config = config.replace(scan_layers=False, remat_policy="none", attention_impl="einsum")
    decoder = param_tree.decoder_of(params)
    place_batch, place_layer = _placements(mesh)
    with contextlib.nullcontext() if mesh is None else sharding.activate(mesh):
        inputs = [place_batch(x) for x in _embed(layer_config, decoder, ids, batch_size)]
        stored = {}
        for i in range(config.num_hidden_layers):
            start = time.perf_counter()
            layer = decoder[f"layers_{i}"]
            stats, outputs = _statistics(layer_config, place_layer(layer), inputs, hessians)
            computes, new = compress_layer(i, layer, stats)
            stored[f"layers_{i}"] = jax.tree.map(jnp.asarray, new)
            if propagate == "compressed":
                computes = place_layer(computes)
                outputs = [_forward(layer_config, computes, x) for x in inputs]
            inputs = outputs
            jax.block_until_ready(inputs)
            if on_layer is not None:
                on_layer(i, time.perf_counter() - start)
    params = jax.tree.map(lambda x: x, params)  # new containers, the same arrays
    param_tree.decoder_of(params).update(stored)
    if config.scan_layers:
        params = param_tree.stack_layers(params, config.num_hidden_layers)
    return params


def _placements(mesh):
    """(place a batch [b, T, D], place a layer's params): split over the mesh's data axes and
    replicated, or left where they are without a mesh."""
    if mesh is None:
        return (lambda x: x), (lambda tree: tree)
    batch = sharding.batch_sharding(mesh, ndim=3)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return (lambda x: jax.device_put(x, batch)), (lambda tree: jax.device_put(tree, replicated))


def _embed(config: OPTConfig, decoder: dict, ids: np.ndarray, batch_size: int) -> list:
    """The layer-0 inputs [b, T, D] of each calibration batch: token embeddings, project_in and
    learned positions (OPT's offset of 2), as the decoder computes them."""
    positions = jnp.arange(ids.shape[1])[None, :]
    embed = jax.jit(
        lambda d, batch: OPTDecoder(config).apply(
            {"params": d},
            batch,
            None,
            jnp.broadcast_to(positions, batch.shape),
            method=OPTDecoder._embed,
        )  # fmt: skip
    )
    outer = {k: v for k, v in decoder.items() if not k.startswith("layers")}
    return [embed(outer, ids[b : b + batch_size]) for b in range(0, len(ids), batch_size)]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _layer_pass(config: OPTConfig, layer: dict, x, reduce: str | None):
    """One layer over a batch x [b, T, D]: (its output [b, T, D], {input name: (sum of x x^T
    [in, in] or None, max |x| [in])} when `reduce` is "hessian" or "absmax", else {})."""
    batch, length = x.shape[:2]
    _, allowed, _, _ = positions_and_mask(None, None, (batch, length))  # causal, no padding
    seen = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, Linear):
            seen[context.module.name] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record) if reduce else contextlib.nullcontext():
        out, _ = OPTDecoderLayer(config).apply({"params": layer}, x, allowed, None, None, True)
    stats = {}
    if reduce:
        for key, name in _RECORDED.items():
            inputs = seen[name]  # [b, T, in] (out_proj: [b, T, N, H])
            width = math.prod(inputs.shape[2:])
            x2 = inputs.reshape(-1, width).astype(jnp.float32)
            xtx = x2.T @ x2 if reduce == "hessian" else None
            stats[key] = (xtx, jnp.abs(x2).max(axis=0))
    return out, stats


def _forward(config: OPTConfig, layer: dict, x):
    return _layer_pass(config, layer, x, None)[0]


def _statistics(config: OPTConfig, layer: dict, inputs: list, hessians: bool):
    """(LayerStatistics over all batches, the float layer's outputs per batch)."""
    sums, absmax, tokens, outputs = {}, {}, 0, []
    for x in inputs:
        out, stats = _layer_pass(config, layer, x, "hessian" if hessians else "absmax")
        outputs.append(out)
        tokens += x.shape[0] * x.shape[1]
        for key, (xtx, top) in stats.items():
            if hessians:
                sums[key] = xtx if key not in sums else sums[key] + xtx
            absmax[key] = top if key not in absmax else jnp.maximum(absmax[key], top)
    hessian = {key: 2.0 * s / tokens for key, s in sums.items()}
    return LayerStatistics(hessian=hessian, absmax=absmax, tokens=tokens), outputs
