"""LoRA adapters (Hu et al. 2021), the model side: add, split and merge them.

The model builds adapters itself when `config.lora_rank > 0` (layers.Linear: `lora_A` [*in, r]
and `lora_B` [r, *out] beside the kernel of every Linear matched by `config.lora_targets`;
y += (lora_alpha / r) * x A B; a fresh adapter is PEFT's init, B = 0). They are ordinary
leaves of the parameter tree, so `apply`, `generate`, sharding rules (A and B carry their
kernel's logical axes) and scan_layers work unchanged; this module handles them as a set:

    config = config.replace(lora_rank=8, lora_alpha=16)
    params = add_adapters(config, base_params, seed=0)       # PEFT's init
    merged_config, merged = merge(config, params)            # plain OPT params, float32 merge

PEFT adapter directories (PEFT's file layout and names) are read and written by
opt_jax/checkpoints/peft.py: `save_adapter(dir, config, params)`, and
`opt_jax.load_pretrained(base_dir, adapter=dir)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from opt_jax._deprecation import moved
from opt_jax.config import OPTConfig
from opt_jax.model import init_params
from opt_jax.param_tree import partition, unpartition

LEAVES = ("lora_A", "lora_B")
# Task heads trained in full beside the adapters (PEFT's modules_to_save), by architecture.
HEADS = {"OPTForSequenceClassification": "score", "OPTForQuestionAnswering": "qa_outputs"}


def is_trained(path: tuple[str, ...]) -> bool:
    """Whether LoRA training updates the parameter at `path` (flattened dict keys): the
    adapters, and a task head in full (PEFT's modules_to_save); the rest stays frozen."""
    return path[-1] in LEAVES or path[0] in HEADS.values()


def split(params) -> tuple[dict, dict]:
    """(base params, adapters): the lora_A / lora_B leaves apart from everything else."""
    adapters, base = partition(params, lambda path: path[-1] in LEAVES)
    return base, adapters


def combine(base, adapters) -> dict:
    """The union of a base tree and an adapter tree (split's inverse)."""
    return unpartition(adapters, base)


def add_adapters(config: OPTConfig, base_params, seed: int = 0) -> dict:
    """base (adapter-free) params + freshly initialised adapters of `config` (PEFT's init)."""
    if not config.lora_rank:
        raise ValueError("config.lora_rank is 0: there are no adapters to add")
    _, fresh = split(init_params(config, seed))
    return combine(base_params, fresh)


def _delta(a: jax.Array, b: jax.Array, kernel_ndim: int) -> jax.Array:
    """A [*lead, *in, r] x B [*lead, r, *out] -> [*lead, *in, *out], in float32."""
    lead = a.ndim + b.ndim - kernel_ndim - 2  # stacked layers (scan_layers) lead with [L]
    n_in = a.ndim - lead - 1
    in_shape, out_shape = a.shape[lead : lead + n_in], b.shape[lead + 1 :]
    a2 = a.astype(jnp.float32).reshape(a.shape[:lead] + (-1, a.shape[-1]))
    b2 = b.astype(jnp.float32).reshape(b.shape[: lead + 1] + (-1,))
    return (a2 @ b2).reshape(a.shape[:lead] + in_shape + out_shape)


def merge(config: OPTConfig, params) -> tuple[OPTConfig, dict]:
    """Folds every adapter into its kernel (W + alpha / r * A B, computed in float32): returns
    an adapter-free config and params with the same outputs (dropout aside)."""
    if not config.lora_rank:
        raise ValueError("config.lora_rank is 0: nothing to merge")
    if config.quantization != "none":
        raise ValueError(
            f"the base is quantised ({config.quantization}): adapters cannot be folded into "
            "its integer kernels; keep them unmerged or merge into the float base"
        )
    scale = config.lora_alpha / config.lora_rank
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if k[-1] not in LEAVES}
    for key in [k for k in flat if k[-1] == "lora_A"]:
        module = key[:-1]
        kernel = flat[module + ("kernel",)]
        delta = _delta(flat[key], flat[module + ("lora_B",)], kernel.ndim)
        out[module + ("kernel",)] = (kernel.astype(jnp.float32) + scale * delta).astype(
            kernel.dtype
        )
    return config.replace(lora_rank=0), traverse_util.unflatten_dict(out)


# The PEFT directory functions moved to opt_jax/checkpoints/peft.py (importable here, warned).
__getattr__ = moved(
    __name__,
    {
        name: "opt_jax.checkpoints.peft"
        for name in ("save_adapter", "load_adapter", "PEFT_PREFIX", "ADAPTER_CONFIG",
                     "ADAPTER_WEIGHTS", "TASK_TYPES")
    },
)  # fmt: skip
