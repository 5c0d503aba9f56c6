"""Between our kernels and the layer steps' [out, in] matrices, and from a compressed matrix to
the parameters of the format that runs it (opt_jax/ops/quantized.py).

Our Linear kernels are [*in, *out] (q_proj [D, N, H], out_proj [N, H, D], fc1 [D, F]); the
compression algorithms, like the papers' code, work on PyTorch's W [out, in] with the inputs
flattened (out_proj's K = N * H, heads outermost).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import traverse_util

from opt_jax.compress import grid
from opt_jax.compress.calibrate import INPUT_OF
from opt_jax.ops.quantized import INT8_MAX, W8A8_MIN_ABSMAX
from opt_jax.param_tree import num_in_axes
from opt_jax.quantization import pack_codes


def linears(layer: dict) -> dict:
    """{module path within the layer, e.g. ("self_attn", "q_proj"): that Linear's params}."""
    flat = traverse_util.flatten_dict(layer)
    return {
        key[:-1]: {k[-1]: v for k, v in flat.items() if k[:-1] == key[:-1]}
        for key in flat
        if key[-1] == "kernel" and key[-2] in INPUT_OF
    }


def replace_linears(layer: dict, new: dict) -> dict:
    """The layer with the Linears at the paths in `new` replaced by their params there."""
    flat = {k: v for k, v in traverse_util.flatten_dict(layer).items() if k[:-1] not in new}
    for path, fields in new.items():
        flat.update({path + (name,): value for name, value in fields.items()})
    return traverse_util.unflatten_dict(flat)


def to_matrix(kernel, path: tuple[str, ...]) -> np.ndarray:
    """Kernel [*in, *out] at module `path` -> float32 W [out, in]."""
    kernel = np.asarray(jax.device_get(kernel), np.float32)
    k = math.prod(kernel.shape[: num_in_axes(path + ("kernel",))])
    return kernel.reshape(k, -1).T


def from_matrix(W, like) -> np.ndarray:
    """W [out, in] -> a kernel of `like`'s shape and dtype."""
    W = np.asarray(jax.device_get(W), np.float32)
    return W.T.reshape(like.shape).astype(like.dtype)


def grid_params(Q, scale, zero, bits: int, group_size: int, like, path) -> dict:
    """The `gptq` format's kernel, scale and zero of a matrix Q [out, in] whose every weight is
    scale * (code - zero) for its column's grid (scale, zero [out, in], constant within each
    group of `group_size` columns, or within each row for -1)."""
    Q, scale, zero = (np.asarray(jax.device_get(a), np.float32) for a in (Q, scale, zero))
    out_shape = like.shape[num_in_axes(path + ("kernel",)) :]
    columns = Q.shape[1]
    span = columns if group_size == -1 else group_size
    codes = np.clip(np.round(Q / scale + zero), 0, 2**bits - 1).astype(np.int64)
    group_scale, group_zero = scale[:, ::span], zero[:, ::span]  # [out, G]
    if not (np.repeat(group_scale, span, axis=1) == scale).all():
        raise ValueError(
            f"{'/'.join(path)}: the weights of a group lie on different grids (act_order with "
            "groups needs static_groups=True to be stored)"
        )
    shape = lambda a: a.T.reshape((-1, *out_shape))  # noqa: E731  [in or G, *out]
    return {
        "kernel": pack_codes(shape(codes), bits),
        "scale": shape(group_scale).astype(np.float32),
        "zero": shape(group_zero).astype(np.float32),
    }


def rtn_grid(W, bits: int, group_size: int):
    """(Q, scale, zero) [out, in] of round-to-nearest on the reference's min-max grid."""
    out, columns = W.shape
    span = columns if group_size == -1 else group_size
    groups = W.reshape(out * (columns // span), span)
    scale, zero = grid.fit(groups, bits)
    Q = grid.quantize(groups, scale, zero, bits).reshape(out, columns)
    expand = lambda a: np.repeat(np.asarray(a).reshape(out, -1), span, axis=1)  # noqa: E731
    return np.asarray(Q), expand(scale), expand(zero)


def int8_rows(W) -> tuple[np.ndarray, np.ndarray]:
    """W [out, in] -> (int8 [out, in], scale [out]): per-output-channel absmax, as SmoothQuant's
    `quantize_weight_per_channel_absmax` (absmax clamped at 1e-5)."""
    W = np.asarray(jax.device_get(W), np.float32)
    scale = np.maximum(np.abs(W).max(axis=1), W8A8_MIN_ABSMAX) / INT8_MAX
    q = np.clip(np.round(W / scale[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale.astype(np.float32)


def w8a8_params(W, like, path, act_scale=None) -> dict:
    """The `w8a8` format's kernel [*out, *in] int8 and scale [*out] (and the static act_scale)."""
    q, scale = int8_rows(W)
    n_in = num_in_axes(path + ("kernel",))
    in_shape, out_shape = like.shape[:n_in], like.shape[n_in:]
    params = {
        "kernel": q.reshape(out_shape + in_shape),
        "scale": scale.reshape(out_shape),
    }
    if act_scale is not None:
        params["act_scale"] = np.float32(act_scale)
    return params
