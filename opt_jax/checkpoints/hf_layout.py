"""Hugging Face names and tensor layouts of our parameters.

Our parameter tree mirrors HF's module tree, so a name is a rename (`layers_3` -> `layers.3`,
`kernel` -> `weight`) and a layout is, for Linear kernels, a transpose (torch stores [out, in],
we store [*in, *out]) plus a reshape into the per-head layout ([D, N, H] for q/k/v, [N, H, D]
for out_proj). Used by the checkpoint readers and writers and by PEFT adapter files.
"""

from __future__ import annotations

import math

import numpy as np

from opt_jax.param_tree import num_in_axes


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the offending tensors."""


# Flax leaf name -> torch leaf name.
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def hf_name(path: tuple[str, ...]) -> str:
    """('model', 'decoder', 'layers_3', 'fc1', 'kernel') -> 'model.decoder.layers.3.fc1.weight'."""
    parts = []
    for part in path[:-1]:
        if part.startswith("layers_") and part[7:].isdigit():
            parts += ["layers", part[7:]]
        else:
            parts.append(part)
    parts.append(_LEAF_NAMES[path[-1]])
    return ".".join(parts)


def hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of the parameter that has `shape` in our layout."""
    if path[-1] == "kernel":
        n_in = num_in_axes(path)
        return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if path[-1] == "bias":
        return (math.prod(shape),)
    return tuple(shape)


def to_hf_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Our layout -> torch layout (a transpose for kernels, a flatten for per-head biases)."""
    if path[-1] == "kernel":
        n_in = num_in_axes(path)
        value = value.reshape(math.prod(value.shape[:n_in]), -1).T
        return np.ascontiguousarray(value)
    if path[-1] == "bias":
        return value.reshape(-1)
    return value


def from_hf_layout(path: tuple[str, ...], value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Torch layout -> our layout, checking the torch shape first."""
    expected = hf_shape(path, shape)
    if tuple(value.shape) != expected:
        raise CheckpointError(
            f"tensor {hf_name(path)} has shape {tuple(value.shape)}, the config expects {expected}"
        )
    if path[-1] == "kernel":
        return value.T.reshape(shape)
    return value.reshape(shape)
