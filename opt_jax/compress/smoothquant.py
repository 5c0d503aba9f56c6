"""SmoothQuant (Xiao et al. 2023): W8A8, int8 weights and int8 activations, made accurate by
moving the activations' outlier channels into the weights first.

The reference is mit-han-lab/smoothquant (`smooth.py`, `fake_quant.py`, `calibration.py`):
  - calibration records, for each input feature j of q/k/v (the first LayerNorm's output) and
    of fc1 (the second's), max |X_j| over the calibration tokens of the float model;
  - s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (max |W_j| over the rows of q, k and v
    together, clamped at 1e-5; s clamped at 1e-5) is folded into the LayerNorm before
    (its scale and bias divided by s) and into those Linears (column j of W times s_j): the
    float model computes exactly what it did, with activations easier to quantise;
  - every decoder Linear then runs int8 x int8 with int32 accumulation: weights per output
    channel (absmax / 127), activations per token at run time (`activations="per_token"`) or
    with one static scale per Linear calibrated on the smoothed model
    (`activations="static"`: max |x| / 127 over the calibration tokens).
As in the reference's W8A8 linear layers, the attention products (q k^T, p v) stay in float.
`alpha=None` quantises without smoothing: the naive W8A8 baseline.
"""

from __future__ import annotations

import numpy as np

from opt_jax.compress import calibrate, formats
from opt_jax.config import ACTIVATION_QUANTIZATIONS
from opt_jax.ops.quantized import INT8_MAX, W8A8_MIN_ABSMAX

# The LayerNorm each smoothed input comes out of, and the Linears reading it.
SMOOTHED = (
    ("self_attn_layer_norm", "qkv", (("self_attn", "q_proj"), ("self_attn", "k_proj"),
                                     ("self_attn", "v_proj"))),
    ("final_layer_norm", "fc1", (("fc1",),)),
)  # fmt: skip


def smoothing_factors(act_max, weights, alpha: float) -> np.ndarray:
    """s [in] for input maxima act_max [in] and the Linears W [out, in] that read them."""
    weight_max = np.max([np.abs(W).max(axis=0) for W in weights], axis=0)
    weight_max = np.maximum(weight_max, W8A8_MIN_ABSMAX)
    s = np.power(act_max, alpha) / np.power(weight_max, 1 - alpha)
    return np.maximum(s, W8A8_MIN_ABSMAX).astype(np.float32)


def smoothquant(config, params, calibration_ids, alpha: float | None = 0.5, *,
                activations: str = "per_token", batch_size: int = 8, mesh=None,
                on_layer=None):  # fmt: skip
    """(qconfig, qparams): the model smoothed and quantised to W8A8 (see the module docstring).

    Args:
      config, params: a float pre-LN model with LayerNorm weights (post-LN opt-350m has no
        LayerNorm in front of q/k/v to fold the smoothing into; alpha=None still works there).
      calibration_ids: int [N, T] token sequences (the paper: 512 sequences of 512 tokens).
      alpha: migration strength in [0, 1] (0.5 for most OPTs in the paper), or None for no
        smoothing (naive W8A8).
      activations: "per_token" (dynamic) or "static" (per tensor, calibrated).
      batch_size, mesh, on_layer: as opt_jax.compress.gptq.

    Returns:
      (qconfig, qparams) with quantization "w8a8".
    """
    calibrate.check_calibration(config, calibration_ids)
    if alpha is not None:
        if not (isinstance(alpha, int | float) and 0 <= alpha <= 1):
            raise ValueError(f"alpha must be in [0, 1] (or None: no smoothing), got {alpha!r}")
        if not (config.do_layer_norm_before and config.layer_norm_elementwise_affine):
            raise ValueError(
                "SmoothQuant folds its factors into the LayerNorms before q/k/v and fc1: this "
                "model has none to fold into (post-LN, or LayerNorms without weights); use "
                "alpha=None for plain W8A8"
            )
    if activations not in ACTIVATION_QUANTIZATIONS:
        raise ValueError(
            f"activations must be one of {ACTIVATION_QUANTIZATIONS}, got {activations!r}"
        )
    static = activations == "static"

    def compress_layer(index, layer, stats):
        maxima = {key: np.asarray(m, np.float32) for key, m in stats.absmax.items()}
        fields = formats.linears(layer)
        weights = {path: formats.to_matrix(f["kernel"], path) for path, f in fields.items()}
        norms = {}
        if alpha is not None:
            for norm, key, paths in SMOOTHED:
                s = smoothing_factors(maxima[key], [weights[p] for p in paths], alpha)
                norms[norm] = {name: np.asarray(v, np.float32) / s
                               for name, v in layer[norm].items()}  # fmt: skip
                for p in paths:
                    weights[p] = weights[p] * s[None, :]
                maxima[key] = maxima[key] / s  # the smoothed inputs' maxima
        stored = {}
        for path, f in fields.items():
            act_max = maxima[calibrate.INPUT_OF[path[-1]]].max()
            act_scale = max(float(act_max), W8A8_MIN_ABSMAX) / INT8_MAX if static else None
            stored[path] = {**f, **formats.w8a8_params(weights[path], f["kernel"], path,
                                                       act_scale)}  # fmt: skip
        stored_layer = formats.replace_linears(layer, stored)
        stored_layer.update(
            {
                norm: {**layer[norm], **{k: v.astype(layer[norm][k].dtype) for k, v in n.items()}}
                for norm, n in norms.items()
            }  # fmt: skip
        )
        return layer, stored_layer

    qparams = calibrate.walk(config, params, calibration_ids, compress_layer, hessians=False,
                             propagate="float", batch_size=batch_size, mesh=mesh,
                             on_layer=on_layer)  # fmt: skip
    return config.replace(quantization="w8a8", quant_activations=activations), qparams
