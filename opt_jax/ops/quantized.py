"""The quantised matmuls that a quantised Linear runs (formats: opt_jax/quantization.py).

A leaf under the layers: pure functions of arrays, plus `quantized_matmul`, which declares a
quantised Linear's parameters on the module it is given. Quantising a parameter tree (and its
inverse) lives in opt_jax/quantization.py, above the model.
"""

from __future__ import annotations

import contextlib
import contextvars

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INT8_MAX, INT4_MAX = 127.0, 7.0


def _axes(names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _per_call(weights, x):
    """The quantised weights, tied to this call's activations by an optimization barrier.

    Inside a decode loop the weights are loop-invariant, and XLA hoists their conversion to
    float out of the loop: every Linear's float copy then lives for the whole loop (a 6.7b int8
    model asked for 34 GB at its first `generate`). Through the barrier the weights depend on
    the activations, so each conversion happens where it is used and is freed after it.
    """
    return jax.lax.optimization_barrier((weights, x))


def quantized_matmul(linear, x, n_in: int):
    """x [.., *in] . W for a quantised Linear (its params are declared here, so the module's
    parameter tree is the quantised one). Returns [.., *out] in the compute dtype."""
    cfg = linear.config
    in_shape, out_axes = x.shape[-n_in:], linear.out_axes
    k = int(np.prod(in_shape))
    dtype = cfg.compute_dtype
    if cfg.quantization == "int4":
        group = cfg.quant_group_size
        # The packed rows run over the flattened input features, the leading input axis
        # outermost (out_proj: heads, then head_dim), so blocks of rows are blocks of that axis
        # and shard with it; a group's scale may straddle shards, so scales stay whole.
        packed = linear.param(
            "kernel", _axes((linear.in_axes[0], *out_axes)), (k // 2, *linear.features), jnp.uint8
        )
        scale = linear.param(
            "scale", _axes((None, *out_axes)), (k // group, *linear.features), jnp.float32
        )
        (packed, scale), x = _per_call((packed, scale), x)
        w = dequantize_int4(packed, scale, group).reshape(in_shape + linear.features)
        return jnp.tensordot(x.astype(dtype), w.astype(dtype), n_in)
    if cfg.quantization == "gptq":
        # Codes packed along the flattened input rows (eight rows in `bits` bytes), sharded
        # with the leading input axis as int4's; a (scale, zero) pair per group and output.
        groups = 1 if cfg.quant_group_size == -1 else k // cfg.quant_group_size
        packed = linear.param(
            "kernel", _axes((linear.in_axes[0], *out_axes)),
            (k * cfg.quant_bits // 8, *linear.features), jnp.uint8,
        )  # fmt: skip
        grid_shape = (groups, *linear.features)
        scale = linear.param("scale", _axes((None, *out_axes)), grid_shape, jnp.float32)
        zero = linear.param("zero", _axes((None, *out_axes)), grid_shape, jnp.float32)
        (packed, scale, zero), x = _per_call((packed, scale, zero), x)
        w = dequantize_grid(packed, scale, zero, cfg.quant_bits).reshape(in_shape + linear.features)
        return jnp.tensordot(x.astype(dtype), w.astype(dtype), n_in)
    q = linear.param(
        "kernel", _axes(out_axes + linear.in_axes), linear.features + in_shape, jnp.int8
    )
    scale = linear.param("scale", _axes(out_axes), linear.features, jnp.float32)
    if cfg.quantization == "w8a8":
        act_scale = None
        if cfg.quant_activations == "static":
            act_scale = linear.param("act_scale", _axes(()), (), jnp.float32)
        q, x = _per_call(q, x)
        return w8a8_matmul(x, q, scale, n_in, act_scale).astype(dtype)
    q, x = _per_call(q, x)
    if cfg.quantization == "int8":
        return int8_matmul(x, q, scale, n_in).astype(dtype)
    return llm_int8_matmul(x, q, scale, n_in, cfg.llm_int8_threshold).astype(dtype)


_ROWS_BY_ROWS = (((1,), (1,)), ((), ()))  # dot_general: [M, K] . [O, K] -> [M, O]


def _as_rows(x, q, n_in: int, dtype=jnp.float32):
    """x [.., *in] and a kernel q [*out, *in] as x2 [M, K] in `dtype` and w2 [O, K], with the
    shape [.., *out] that a product [M, O] is reshaped to."""
    k = int(np.prod(x.shape[-n_in:]))
    out_shape = x.shape[:-n_in] + q.shape[: q.ndim - n_in]
    return x.reshape((-1, k)).astype(dtype), q.reshape((-1, k)), out_shape


# The platform the traced program is compiled for (None: jax's default backend). Compiling
# ahead of time for a TPU slice traces on a CPU: opt_jax/training/aot.py says which it is.
_TARGET = contextvars.ContextVar("opt_jax_quantized_target", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
    """Traces inside this context are for `platform` ("cpu", "tpu", "gpu")."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def _for_cpu() -> bool:
    return (_TARGET.get() or jax.default_backend()) == "cpu"


ACTIVATION_LIMBS = 3
# Up to this many rows of activations int8_matmul multiplies their limbs in int8 (measured on an
# AMD EPYC, fc1's shape: 32 rows 2.2 ms against 4.0 for the float copy, 64 rows 5.3 against 4.7).
LIMB_MAX_ROWS = 32


def int8_limbs(x2, limbs: int = ACTIVATION_LIMBS):
    """Float rows x2 [M, K] as a sum of int8 limbs: x2 ~ sum_i limb_i * scale_i.

    The first limb is the row's absmax int8 quantisation (scale = absmax / 127); each next one
    quantises what is left, which is at most half the previous scale, with a 254x finer scale.
    Three limbs carry 7 + 8 + 8 = 23 bits per value relative to the row's absmax, about what
    float32's 24-bit significand holds (the error is below absmax * 2^-24). Returns
    (int8 [limbs * M, K], float32 scales [limbs * M, 1]), limb-major.
    """
    scale = jnp.maximum(jnp.abs(x2).max(axis=1, keepdims=True), 1e-30) / INT8_MAX
    rest, parts, scales = x2, [], []
    for _ in range(limbs):
        limb = jnp.clip(jnp.round(rest / scale), -INT8_MAX, INT8_MAX)
        parts.append(limb.astype(jnp.int8))
        scales.append(scale)
        rest = rest - limb * scale
        scale = scale / (2 * INT8_MAX)
    return jnp.concatenate(parts), jnp.concatenate(scales)


def int8_matmul(x, q, scale, n_in: int):
    """Weight-only int8: x [.., *in] (float) . W with W = (q [*out, *in] * scale [*out])^T.

    XLA:CPU has no matmul that converts int8 weights as it reads them: `x @ q.astype(f32)`
    writes and reads a float copy of W, slower than float32 weights. For up to `LIMB_MAX_ROWS`
    rows (decoding) the activations are split into `ACTIVATION_LIMBS` int8 limbs instead
    (`int8_limbs`: float32's precision, not an activation quantisation), multiplied by the int8
    weights in one int8 x int8 -> int32 product over the stacked limbs, and summed back with
    their scales: XLA:CPU's int8 library product reads the weights about twice as fast as the
    float32 one at these shapes (and three rows avoid its missing one-row kernel). The int32
    sums hold K * 127^2 < 2^31 for K < 133,000 (OPT-175B's widest input is 49,152).

    On accelerators the product is x (its own dtype) . W converted to that dtype, which their
    compilers fuse into the matmul's reads. The limbs are an XLA:CPU measure and would cost a
    tensor-parallel model three int32 partial sums per row in each all-reduce, 6x a bfloat16
    model's bytes (what the TPU compiler showed for OPT-13b on a v5e-8, experiments/tpu).
    """
    if not _for_cpu():
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        x2, w2, out_shape = _as_rows(x, q, n_in, dtype)
        y = jax.lax.dot_general(x2, w2.astype(dtype), _ROWS_BY_ROWS).astype(jnp.float32)
        return (y * scale.reshape(-1).astype(jnp.float32)).reshape(out_shape)
    x2, w2, out_shape = _as_rows(x, q, n_in)
    rows = x2.shape[0]
    if rows > LIMB_MAX_ROWS:
        # Many rows (prefill, scoring): the float copy of W is shared by all of them, while
        # XLA:CPU's int8 product slows down past a few dozen rows (5x float32's time at 512).
        y = jax.lax.dot_general(x2, w2.astype(jnp.float32), _ROWS_BY_ROWS)
    else:
        xq, limb_scale = int8_limbs(x2)  # [L * M, K], [L * M, 1]
        acc = jax.lax.dot_general(xq, w2, _ROWS_BY_ROWS, preferred_element_type=jnp.int32)
        y = (acc.astype(jnp.float32) * limb_scale).reshape((-1, rows, acc.shape[-1])).sum(0)
    return (y * scale.reshape(-1).astype(jnp.float32)).reshape(out_shape)


def dequantize_int4(packed, scale, group: int):
    """[K / 2, *out] uint8 + [K / group, *out] scales -> [K, *out] float32."""
    low = (packed & 0xF).astype(jnp.int8)
    high = (packed >> 4).astype(jnp.int8)
    values = jnp.stack([low, high], axis=1).reshape((-1,) + packed.shape[1:])  # [K, *out]
    values = jnp.where(values > 7, values - 16, values).astype(jnp.float32)  # two's complement
    grouped = values.reshape((scale.shape[0], group) + values.shape[1:])
    return (grouped * scale[:, None]).reshape(values.shape)


def unpack_codes(packed, bits: int):
    """[K * bits / 8, *out] uint8 -> [K, *out] int32 codes in [0, 2^bits).

    Eight consecutive rows share `bits` bytes, row j of the eight at bit offset j * bits
    (little-endian: a value that crosses a byte boundary continues in the next byte's low bits),
    so 2-, 3-, 4- and 8-bit codes all pack without padding.
    """
    groups = packed.reshape((-1, bits) + packed.shape[1:]).astype(jnp.uint32)  # [K/8, bits, ..]
    mask = (1 << bits) - 1
    rows = []
    for j in range(8):
        byte, shift = divmod(j * bits, 8)
        word = groups[:, byte]
        if byte + 1 < bits:  # the value may continue in the next byte
            word = word | (groups[:, byte + 1] << 8)
        rows.append((word >> shift) & mask)
    return jnp.stack(rows, axis=1).reshape((-1,) + packed.shape[1:]).astype(jnp.int32)


def dequantize_grid(packed, scale, zero, bits: int):
    """GPTQ's asymmetric format: codes [K, *out] (packed) with scale and zero [G, *out], one
    pair per group of K / G consecutive input rows -> [K, *out] float32 = scale * (q - zero)."""
    codes = unpack_codes(packed, bits).astype(jnp.float32)
    grouped = codes.reshape((scale.shape[0], -1) + codes.shape[1:])  # [G, K / G, *out]
    return ((grouped - zero[:, None]) * scale[:, None]).reshape(codes.shape)


# SmoothQuant's reference clamps every absmax at this before dividing by 127 (fake_quant.py).
W8A8_MIN_ABSMAX = 1e-5


def w8a8_matmul(x, q, scale, n_in: int, act_scale=None):
    """W8A8 (SmoothQuant's int8 x int8): x [.., *in] quantised to int8, times the int8 weights
    q [*out, *in] (per-channel `scale` [*out]), accumulated in int32.

    act_scale None: dynamic per-token scales (each row's absmax / 127); a float32 scalar: the
    static per-tensor scale calibrated on the smoothed model (values beyond it saturate).
    """
    x2, w2, out_shape = _as_rows(x, q, n_in)
    rows = x2.shape[0]
    if rows == 1:  # XLA:CPU's one-row int8 product is slow (see llm_int8_matmul)
        x2 = jnp.concatenate([x2, jnp.zeros_like(x2)])
    if act_scale is None:
        s = jnp.maximum(jnp.abs(x2).max(axis=1, keepdims=True), W8A8_MIN_ABSMAX) / INT8_MAX
    else:
        s = act_scale.astype(jnp.float32)
    xq = jnp.clip(jnp.round(x2 / s), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    acc = jax.lax.dot_general(xq, w2, _ROWS_BY_ROWS, preferred_element_type=jnp.int32)  # [M, O]
    y = acc.astype(jnp.float32) * s * scale.reshape(-1).astype(jnp.float32)[None, :]
    return y[:rows].reshape(out_shape)


def outlier_capacity(k: int) -> int:
    """How many outlier columns (of k input features) LLM.int8() gathers into its float product
    per call. The paper finds outliers in few feature dimensions (about 6 at 6.7B parameters);
    a call with more than this many takes the dense float product instead (same result)."""
    return min(k, max(16, k // 32))


def llm_int8_matmul(x, q, scale, n_in: int, threshold: float):
    """LLM.int8(): x [.., *in] with int8 weights q [*out, *in] and scales [*out].

    Columns of x (input features) holding any |value| > threshold: x_outlier . dequant(W) in
    float32; the rest: row-wise absmax int8 activations x int8 weights, int32 accumulation,
    rescaled by the row and channel scales. threshold = inf gives plain vector-wise int8.

    The outlier columns and their weight rows are gathered (at most `outlier_capacity` of
    them), so the float product costs a few rows of W rather than a float copy of all of it;
    with more outliers than that the dense product runs, which computes the same thing, and
    with none (most calls below 6.7B parameters) nothing runs.
    """
    x2, w2, out_shape = _as_rows(x, q, n_in)
    rows, k = x2.shape
    if rows == 1:
        # XLA:CPU runs a one-row int8 product ~15x slower than a two-row one (no library
        # kernel takes it): one row of zeros costs nothing next to that.
        x2 = jnp.concatenate([x2, jnp.zeros_like(x2)])
    flat_scale = scale.reshape(-1).astype(jnp.float32)
    outlier = jnp.abs(x2).max(axis=0) > threshold  # [K]
    regular = jnp.where(outlier[None, :], 0.0, x2)
    row_scale = jnp.maximum(jnp.abs(regular).max(axis=1, keepdims=True), 1e-12) / INT8_MAX
    xq = jnp.clip(jnp.round(regular / row_scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    acc = jax.lax.dot_general(xq, w2, _ROWS_BY_ROWS, preferred_element_type=jnp.int32)  # [M, O]
    y = acc.astype(jnp.float32) * row_scale * flat_scale[None, :]
    if threshold != float("inf"):
        capacity = outlier_capacity(k)

        def gathered(x2, w2):
            idx = jnp.nonzero(outlier, size=capacity, fill_value=0)[0]  # [C]
            used = jnp.arange(capacity) < outlier.sum()  # fill entries contribute nothing
            x_hi = jnp.where(used[None, :], x2[:, idx], 0.0)  # [M, C]
            w_hi = w2[:, idx].astype(jnp.float32) * flat_scale[:, None]  # [O, C]
            return jax.lax.dot_general(x_hi, w_hi, _ROWS_BY_ROWS)

        def dense(x2, w2):
            high = jnp.where(outlier[None, :], x2, 0.0)
            w = w2.astype(jnp.float32) * flat_scale[:, None]
            return jax.lax.dot_general(high, w, _ROWS_BY_ROWS)

        def none(x2, w2):  # the common case below 6.7B parameters: nothing to add
            return jnp.zeros((x2.shape[0], w2.shape[0]), jnp.float32)

        count = outlier.sum()
        branch = (count > 0).astype(jnp.int32) + (count > capacity).astype(jnp.int32)
        y = y + jax.lax.switch(branch, (none, gathered, dense), x2, w2)
    return y[:rows].reshape(out_shape)
