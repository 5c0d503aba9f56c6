"""Post-training compression of OPT: GPTQ, SparseGPT and SmoothQuant, calibrated layer by layer
as the papers do (opt_jax/compress/calibrate.py), with the baselines they compare against.

Whole models (a float config and params, calibration token ids [N, T]):
  qconfig, qparams = opt_jax.compress.gptq(config, params, ids, bits=4, group_size=128)
  config, pruned = opt_jax.compress.sparsegpt(config, params, ids, sparsity=0.5)  # or 2:4
  qconfig, qparams = opt_jax.compress.smoothquant(config, params, ids, alpha=0.5)  # W8A8
  qconfig, qparams = opt_jax.compress.round_to_nearest(config, params, bits=4)    # baselines
  config, pruned = opt_jax.compress.magnitude_prune(config, params, sparsity=0.5)
  opt_jax.model_for(qconfig).apply({"params": qparams}, ids)  # as any model

One Linear layer (W [out, in], PyTorch's layout; H = 2 X X^T / n [in, in] of its inputs):
  w_hat = opt_jax.compress.gptq_layer(W, H, bits=4, group_size=-1, act_order=False)
  w_hat = opt_jax.compress.sparsegpt_layer(W, H, sparsity=0.5)   # or prune_n=2, prune_m=4
  w_rtn = opt_jax.compress.rtn(W, bits=4, group_size=128)        # the round-to-nearest baseline
"""

from opt_jax.compress.baselines import magnitude_prune, round_to_nearest
from opt_jax.compress.calibrate import LayerStatistics
from opt_jax.compress.gptq import gptq, gptq_layer
from opt_jax.compress.grid import rtn
from opt_jax.compress.smoothquant import smoothquant
from opt_jax.compress.sparsegpt import sparsegpt, sparsegpt_layer

__all__ = [
    "LayerStatistics",
    "gptq",
    "gptq_layer",
    "magnitude_prune",
    "round_to_nearest",
    "rtn",
    "smoothquant",
    "sparsegpt",
    "sparsegpt_layer",
]
