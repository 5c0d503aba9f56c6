"""Post-training compression of OPT: GPTQ and SparseGPT layer steps (whole-model calibration
and SmoothQuant build on them).

  w_hat = opt_jax.compress.gptq_layer(W, H, bits=4, group_size=-1, act_order=False)
  w_hat = opt_jax.compress.sparsegpt_layer(W, H, sparsity=0.5)   # or prune_n=2, prune_m=4
  w_rtn = opt_jax.compress.rtn(W, bits=4, group_size=128)        # the round-to-nearest baseline

W is [out, in] (PyTorch's Linear layout), H = 2 X X^T / n [in, in] over calibration inputs.
"""

from opt_jax.compress.gptq import gptq_layer
from opt_jax.compress.grid import rtn
from opt_jax.compress.sparsegpt import sparsegpt_layer

__all__ = ["gptq_layer", "rtn", "sparsegpt_layer"]
