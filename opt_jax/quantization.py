"""Weight-only quantisation of OPT's Linear layers: int8, int4 and LLM.int8().

    qconfig, qparams = opt_jax.quantize(config, params, "int8")   # or "int4", "llm_int8"
    opt_jax.model_for(qconfig).apply({"params": qparams}, ids)     # the same modules
    opt_jax.generate(opt_jax.OPTForCausalLM(qconfig), qparams, ids, max_new_tokens=20)

Formats (symmetric absmax, zero point 0), per Linear with kernel W [*in, *out]:
- int8: `kernel` int8 [*out, *in] (transposed, as torch's Linear.weight) and `scale` [*out] (one
  per output channel): W ~ (kernel * scale)^T. XLA:CPU's int8 matmul reads this layout up to
  2.2x faster than [*in, *out] (fc2 of 125m at 2 rows: 0.15 vs 0.34 ms).
- int4: `kernel` uint8 [in / 2, *out] holding two 4-bit values per byte (rows 2i in the low
  nibble, 2i + 1 in the high one: JAX's int4 dtype still takes a byte per value on CPU) and
  `scale` [in / group, *out], one per group of `quant_group_size` input rows.
- llm_int8 (Dettmers et al. 2022, "LLM.int8()"): int8 weights as for int8; at run time the
  activation columns (hidden dimensions) holding any value above `llm_int8_threshold` (6.0)
  are multiplied in higher precision with the dequantised weight rows, all others in int8 x int8
  with row-wise (vector-wise) activation scales, int32 accumulation.
Two more formats are written by opt_jax.compress from calibration data (GPTQ, SparseGPT,
SmoothQuant), not by `quantize`:
- gptq: `kernel` uint8 [K * bits / 8, *out], `quant_bits`-bit codes (2-8) packed eight rows into
  `bits` bytes, with `scale` and `zero` [G, *out] (one asymmetric grid per row and group of
  `quant_group_size` input rows, G = 1 for -1): W ~ scale * (code - zero).
- w8a8: int8 kernels as int8's (SmoothQuant's per-channel weights) whose inputs are quantised to
  int8 at run time, per token or with a calibrated per-Linear `act_scale`, int32 accumulation.
Scales keep their output channels' logical axes, so sharding rules shard them with the kernel;
int4's packed rows shard with the leading input axis (out_proj's: the heads, under tensor
parallelism), tested on a 2 x 2 x 2 mesh in tests/sharding_checks.py.

Memory: XLA converts a quantised kernel to float where it is used, but in an unrolled model it
schedules the conversions of every layer together (a 125m forward pass held all 340 MB of
float kernels at once). With `scan_layers=True` each scan step converts one layer's kernels
(26 MB), so load big quantised models that way (`load_pretrained(path, quantize="int8",
scan_layers=True)`; scripts/generate.py and scripts/serve.py do).
Embeddings (and the tied LM head) and LayerNorms stay in the compute dtype: they are a small
share of a large model's bytes, the embedding is read by a gather rather than a matmul, and the
LM head's errors go straight into every logit.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from opt_jax.config import QUANTIZATIONS, OPTConfig
from opt_jax.model import abstract_params
from opt_jax.ops.quantized import (  # noqa: F401  (the kernels, re-exported for old imports)
    ACTIVATION_LIMBS,
    INT4_MAX,
    INT8_MAX,
    LIMB_MAX_ROWS,
    dequantize_grid,
    dequantize_int4,
    int8_limbs,
    int8_matmul,
    llm_int8_matmul,
    outlier_capacity,
    quantized_matmul,
)
from opt_jax.param_tree import num_in_axes

# The formats `quantize` writes from the weights alone (the others need calibration data).
ROUND_TO_NEAREST = ("int8", "int4", "llm_int8")


# ---------------------------------------------------------------------------------------------
# Quantising parameters
# ---------------------------------------------------------------------------------------------
def _quantize_int8(w: np.ndarray, n_out: int):
    """[*in, *out] float -> (int8 [*in, *out], scale [*out]) per output channel."""
    axes = tuple(range(w.ndim - n_out))
    scale = np.maximum(np.abs(w).max(axis=axes), 1e-12) / INT8_MAX
    q = np.clip(np.round(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale.astype(np.float32)


def _quantize_int4(w: np.ndarray, n_out: int, group: int, name: str):
    """[*in, *out] float -> (uint8 [K / 2, *out], scale [K / group, *out])."""
    out_shape = w.shape[w.ndim - n_out :]
    w = w.reshape((-1,) + out_shape)  # [K, *out]
    k = w.shape[0]
    if k % group:
        raise ValueError(
            f"int4 group size {group} does not divide the input dimension {k} of {name}"
        )
    grouped = w.reshape((k // group, group) + out_shape)
    scale = np.maximum(np.abs(grouped).max(axis=1), 1e-12) / INT4_MAX  # [K / group, *out]
    q = np.clip(np.round(grouped / scale[:, None]), -8, 7).astype(np.int8).reshape(w.shape)
    nibbles = (q & 0xF).astype(np.uint8)
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return packed, scale.astype(np.float32)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes [K, *out] in [0, 2^bits) -> uint8 [K * bits / 8, *out]: every eight rows in
    `bits` bytes, row j at bit offset j * bits (the layout ops.quantized.unpack_codes reads)."""
    if codes.shape[0] % 8:
        raise ValueError(f"{codes.shape[0]} rows of codes do not pack in groups of 8")
    rows = codes.reshape((-1, 8) + codes.shape[1:]).astype(np.uint32)
    out = np.zeros((rows.shape[0], bits) + codes.shape[1:], np.uint32)
    for j in range(8):
        byte, shift = divmod(j * bits, 8)
        value = rows[:, j] << shift
        out[:, byte] |= value & 0xFF
        if byte + 1 < bits:
            out[:, byte + 1] |= value >> 8
    return out.astype(np.uint8).reshape((-1,) + codes.shape[1:])


def quantize(config: OPTConfig, params, method: str, *, group_size: int | None = None):
    """(config, params) with every Linear kernel quantised by `method` ("int8", "int4" or
    "llm_int8"); embeddings, LayerNorms and biases are kept.

    Raises:
      ValueError: an unknown method, an already quantised model, adapters (merge them first),
        or an int4 group size that does not divide a layer's input dimension, naming it.
    """
    check_method(config, method)
    qconfig = config.replace(
        quantization=method, **({"quant_group_size": group_size} if group_size else {})
    )
    flat = traverse_util.flatten_dict(nn.unbox(params))
    if method == "int4":  # before building the quantised tree, whose shapes need it
        for key, value in flat.items():
            if key[-1] == "kernel":
                lead = int(qconfig.scan_layers and "layers" in key)
                k = int(np.prod(value.shape[lead : lead + num_in_axes(key)]))
                if k % qconfig.quant_group_size:
                    raise ValueError(
                        f"int4 group size {qconfig.quant_group_size} does not divide the input "
                        f"dimension {k} of {'/'.join(key[:-1])}"
                    )
    expected = traverse_util.flatten_dict(abstract_params(qconfig))
    out = {}
    for key, value in flat.items():
        module = key[:-1]
        if key[-1] != "kernel":
            out[key] = value
            continue
        w = np.asarray(jax.device_get(value), np.float32)
        stacked = qconfig.scan_layers and "layers" in module
        n_out = _n_out(expected[module + ("scale",)].shape, method, stacked)
        name = "/".join(module)
        if stacked:  # quantise each layer's slice
            pieces = [
                _quantize(w[i], n_out, method, qconfig.quant_group_size, name)
                for i in range(w.shape[0])
            ]
            q = np.stack([p[0] for p in pieces])
            scale = np.stack([p[1] for p in pieces])
        else:
            q, scale = _quantize(w, n_out, method, qconfig.quant_group_size, name)
        out[key], out[module + ("scale",)] = jnp.asarray(q), jnp.asarray(scale)
    missing = sorted("/".join(k) for k in expected if k not in out)
    if missing:
        raise ValueError(f"params do not match the config: missing {missing}")
    return qconfig, traverse_util.unflatten_dict(out)


def check_method(config: OPTConfig, method: str) -> None:
    """Raises ValueError unless `config` (a float model) can be quantised by `method`."""
    if method not in ROUND_TO_NEAREST:
        hint = (
            " (written by opt_jax.compress, from calibration data)"
            if method in QUANTIZATIONS
            else ""
        )
        raise ValueError(f"unknown quantisation {method!r}{hint}: choose int8, int4 or llm_int8")
    if config.quantization != "none":
        raise ValueError(f"the model is already quantised ({config.quantization})")
    if config.lora_rank:
        raise ValueError("the params hold LoRA adapters: merge them first (opt_jax.lora.merge)")


def quantize_kernel(w: np.ndarray, n_out: int, config: OPTConfig, name: str):
    """One float kernel [*in, *out] -> (quantised kernel, scale) in `config.quantization`'s
    format (numpy, on the host)."""
    return _quantize(
        np.asarray(w, np.float32), n_out, config.quantization, config.quant_group_size, name
    )


def _n_out(scale_shape, method, stacked) -> int:
    """Number of output axes of a quantised kernel, from its scale's shape."""
    if method == "int4":
        return len(scale_shape) - 1 - int(stacked)
    return len(scale_shape) - int(stacked)


def _quantize(w, n_out, method, group, name):
    """One kernel [*in, *out] in `method`'s storage layout (see the module docstring)."""
    if method == "int4":
        return _quantize_int4(w, n_out, group, name)
    q, scale = _quantize_int8(w, n_out)
    n_in = w.ndim - n_out
    return np.ascontiguousarray(q.transpose(_in_last(n_in, n_out))), scale


def _in_last(n_in: int, n_out: int) -> tuple[int, ...]:
    """The permutation [*in, *out] -> [*out, *in] (its inverse swaps the counts)."""
    return tuple(range(n_in, n_in + n_out)) + tuple(range(n_in))


def float_model_config(config: OPTConfig) -> OPTConfig:
    """`config` unquantised, its quantisation settings back at their defaults."""
    defaults = OPTConfig()
    fields = ("quant_group_size", "llm_int8_threshold", "quant_bits", "quant_activations")
    return config.replace(quantization="none", **{f: getattr(defaults, f) for f in fields})


# The parameters a quantised Linear holds beside its kernel.
QUANT_FIELDS = ("scale", "zero", "act_scale")


def dequantize(config: OPTConfig, params) -> tuple[OPTConfig, dict]:
    """The float32 model a quantised one stands for (kernels dequantised): the reference the
    quantised matmuls are checked against, and the way back to an HF export. (A w8a8 model's
    activations are quantised at run time: its float model is the smoothed one, without that.)"""
    if config.quantization == "none":
        raise ValueError("the model is not quantised")
    flat = traverse_util.flatten_dict(params)
    # A quantised Linear's "scale" (and "zero", "act_scale") sit beside its "kernel" (LayerNorms'
    # scales stay).
    out = {
        k: v
        for k, v in flat.items()
        if not (k[-1] in QUANT_FIELDS and k[:-1] + ("kernel",) in flat)
    }
    float_config = float_model_config(config)
    expected = traverse_util.flatten_dict(abstract_params(float_config))
    for key in [k for k in flat if k[-1] == "kernel"]:
        q, scale = flat[key], flat[key[:-1] + ("scale",)]
        shape = expected[key].shape
        lead = int(config.scan_layers and "layers" in key)  # stacked layers: [L, ...]
        if config.quantization == "gptq":
            zero = flat[key[:-1] + ("zero",)]
            unpack = lambda q, s, z: dequantize_grid(q, s, z, config.quant_bits)  # noqa: E731
            if lead:
                w = jnp.stack([unpack(q[i], scale[i], zero[i]) for i in range(q.shape[0])])
            else:
                w = unpack(q, scale, zero)
        elif config.quantization == "int4":
            group = config.quant_group_size
            if lead:
                w = jnp.stack([dequantize_int4(q[i], scale[i], group) for i in range(q.shape[0])])
            else:
                w = dequantize_int4(q, scale, group)
        else:  # [L?, *out, *in] * scale [L?, *out] -> [L?, *in, *out]
            n_in = q.ndim - scale.ndim
            w = q.astype(jnp.float32) * scale.astype(jnp.float32).reshape(scale.shape + (1,) * n_in)
            n_out = scale.ndim - lead
            w = w.transpose(tuple(range(lead)) + tuple(lead + i for i in _in_last(n_out, n_in)))
        out[key] = w.reshape(shape)
    return float_config, traverse_util.unflatten_dict(out)
