"""Operations on the parameter tree that every layer above the model shares.

A leaf module (it imports no other opt_jax module): the model, the checkpoint readers, LoRA,
quantisation and the training step all reach the tree through these, so none of them needs
another's internals.

Paths are flattened dict keys, e.g. ("model", "decoder", "layers_3", "self_attn", "q_proj",
"kernel"). Two layouts of the decoder layers exist: unrolled (`layers_0` ... `layers_{L-1}`) and
stacked for `scan_layers` (one `layers` subtree whose leaves lead with an [L] axis).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def decoder_of(params: dict) -> dict:
    """The decoder subtree of any head's params (`model/decoder`) or of a bare OPTModel's."""
    return params["decoder"] if "decoder" in params else params["model"]["decoder"]


def tied_embedding(params: dict) -> jax.Array:
    """The token embedding table [V, E], which the LM head shares (OPT ties them)."""
    return decoder_of(params)["embed_tokens"]["embedding"]


def num_in_axes(path: tuple[str, ...]) -> int:
    """How many leading axes of the float kernel at `path` are input axes.

    out_proj's kernel is [N, H, D] (two input axes: heads, head dim); every other kernel is
    [in, *out] with one.
    """
    return 2 if path[-2] == "out_proj" else 1


def stack_layers(params: dict, num_layers: int) -> dict:
    """Unrolled layout (`layers_0` ... `layers_{L-1}`) -> scan layout (`layers`, leading [L])."""
    params = jax.tree.map(lambda x: x, params)  # a copy of the containers, not the arrays
    decoder = decoder_of(params)
    layers = [decoder.pop(f"layers_{i}") for i in range(num_layers)]
    decoder["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return params


def unstack_layers(params: dict) -> dict:
    """Scan layout -> unrolled layout (the inverse of stack_layers)."""
    params = jax.tree.map(lambda x: x, params)
    decoder = decoder_of(params)
    stacked = decoder.pop("layers")
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(num_layers):
        decoder[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params


def place_layers(params: dict, memory_kind: str = "pinned_host") -> dict:
    """params with the stacked decoder layers' kernels (scan layout) moved to `memory_kind`
    memory ("pinned_host": host RAM the accelerator reads directly; "device"), each array
    keeping its sharding. The kernels are all but ~0.1% of a layer's bytes; its biases,
    LayerNorms and quantisation scales stay on the device, as do the embeddings and the head
    (dynamic slices of small host arrays also failed inside libtpu's compiler). Decode them with
    OPTConfig(scan_layers=True, layer_memory=memory_kind)."""
    if "layers" not in decoder_of(params):
        raise ValueError(
            "place_layers needs the scan layout (one stacked `layers` subtree): convert with "
            "opt_jax.param_tree.stack_layers"
        )

    def place(path, x):
        if not is_layer_kernel(path):
            return x
        x = x if isinstance(x, jax.Array) else jnp.asarray(x)
        if memory_kind != "device":
            x = as_words(x)
        return jax.device_put(x, x.sharding.with_memory_kind(memory_kind))

    return jax.tree_util.tree_map_with_path(place, params)


# One-byte codes (int8, packed int4 / GPTQ) in host memory are stored as 4-byte words: libtpu's
# compiler brought about 70% of the int8 stacks into HBM at once when each layer's slice was of
# one-byte elements, and streams them a layer at a time as words (OPT-13b int8 on a v5e-8: 1.04
# -> 0.13 GiB of decode-step temporaries).
_WORDS = {jnp.dtype(jnp.int8): jnp.int32, jnp.dtype(jnp.uint8): jnp.uint32}
_BYTES = {jnp.dtype(w): b for b, w in _WORDS.items()}


def as_words(x: jax.Array) -> jax.Array:
    """A one-byte array [..., K] (K a multiple of 4) as 4-byte words [..., K / 4], the same
    bytes; others as they are. `from_words` inverts it."""
    if x.dtype not in _WORDS or x.shape[-1] % 4:
        return x
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // 4, 4)
    return jax.lax.bitcast_convert_type(grouped, _WORDS[x.dtype])


def host_words(x: np.ndarray) -> np.ndarray:
    """as_words for a host (numpy) array: the same 4-byte words, without a device copy."""
    if np.dtype(x.dtype) not in _WORDS or x.shape[-1] % 4:
        return x
    return np.ascontiguousarray(x).view(np.dtype(_WORDS[np.dtype(x.dtype)]))


def from_words(x: jax.Array) -> jax.Array:
    """as_words' inverse: 4-byte words [..., K / 4] -> one-byte codes [..., K]."""
    if x.dtype not in _BYTES:
        return x
    codes = jax.lax.bitcast_convert_type(x, _BYTES[x.dtype])
    return codes.reshape(*x.shape[:-1], x.shape[-1] * 4)


def is_layer_kernel(path) -> bool:
    """Whether a jax.tree_util key path (or a tuple of names) ends at a Linear kernel of the
    stacked decoder layers: what place_layers moves to host memory."""
    names = [getattr(p, "key", p) for p in path]
    return "layers" in names and names[-1] == "kernel"


def partition(params, trainable: Callable[[tuple[str, ...]], bool] | None):
    """(trained, frozen) subtrees of `params`: `trainable(path)` decides each leaf; None trains
    all (frozen is then empty)."""
    if trainable is None:
        return params, {}
    flat = traverse_util.flatten_dict(params)
    trained = {k: v for k, v in flat.items() if trainable(k)}
    frozen = {k: v for k, v in flat.items() if not trainable(k)}
    return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(frozen)


def unpartition(trained, frozen):
    """partition's inverse: the union of the two subtrees."""
    if not frozen:
        return trained
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trained))
    return traverse_util.unflatten_dict(flat)
