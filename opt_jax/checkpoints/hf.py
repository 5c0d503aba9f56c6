"""Hugging Face OPT checkpoints <-> opt_jax parameters.

Our parameter tree mirrors HF's module tree, so conversion is a rename plus, for linear layers,
a transpose (torch stores [out, in], Flax [in, out]) and a reshape into the per-head layout
([D, N, H] for q/k/v, [N, H, D] for out_proj). Every shape is checked and every key accounted for.

Loading streams one tensor at a time with numpy only (safetensors by plain reads; `.bin` torch
files by torch_reader.py, which never runs pickled code and needs no PyTorch), so peak host
memory stays near one copy of the model. Nothing here touches the network.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from opt_jax import param_tree
from opt_jax._deprecation import moved
from opt_jax.checkpoints import orbax_io, peft
from opt_jax.checkpoints.hf_files import (  # noqa: F401  (the file names: public here)
    _SAFE_SHARD,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    TIED_LM_HEAD,
    TORCH_INDEX,
    TORCH_WEIGHTS,
    canonical_key,
    iter_tensors,
    weight_files,
)
from opt_jax.checkpoints.hf_layout import (  # noqa: F401  (CheckpointError, hf_name: public here)
    CheckpointError,
    from_hf_layout,
    hf_name,
    hf_shape,
    to_hf_layout,
)
from opt_jax.checkpoints.offload import load_offloaded
from opt_jax.config import OPTConfig
from opt_jax.model import abstract_params
from opt_jax.quantization import check_method, quantize_kernel
from opt_jax.quantization import quantize as quantize_params


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    architecture: str | None = None,
    shardings=None,
    adapter: str | os.PathLike | None = None,
    quantize: str | None = None,
    offload: str | None = None,
    memory_limit: int | str | None = None,
    offload_folder: str | os.PathLike | None = None,
    **config_overrides,
) -> tuple[OPTConfig, dict]:
    """Loads an HF-format OPT directory, or one of our orbax exports.

    Args:
      path: a directory with config.json and weights in any of the HF layouts
        (model.safetensors, sharded safetensors + index, pytorch_model.bin (+ index)), or an
        orbax params checkpoint (config.json + params/: `scripts/convert.py --to orbax`, a
        training run's `WORKDIR/export`).
      dtype: compute dtype override (default: the checkpoint's dtype).
      param_dtype: storage dtype the weights are cast to (default: the checkpoint's dtype).
      architecture: override config.json's head (e.g. "OPTModel" for the bare decoder).
      shardings: optional tree of target shardings (unrolled layout, e.g. from
        `sharding.logical_to_shardings(param_logical_axes(config), mesh)`): each tensor goes
        straight to its devices as it is read, so host memory holds one tensor at a time.
      adapter: a PEFT LoRA adapter directory (ours or PEFT's) to add to the base weights:
        the result computes the adapted model (opt_jax.lora.merge folds it in).
      quantize: "int8", "int4" or "llm_int8" (see opt_jax/quantization.py): each Linear
        kernel is quantised as it is read, so host memory holds the quantised model plus one
        float tensor, never the float model (HF layouts; `quant_group_size=` sets int4's
        groups).
      offload: "disk" keeps the decoder layers in the directory's safetensors files: the
        params returned are a `DiskLayers` (checkpoints/offload.py) that `opt_jax.generate`
        runs layer by layer, reading each layer while the one before computes
        (generation/streamed.py), for models larger than memory. "host" (accelerators) reads
        the decoder layers' kernels into host memory (`pinned_host`, stacked in the scan
        layout as they are read, never on the device) and returns a config with
        scan_layers=True, layer_memory="pinned_host": each layer's kernels move to the chip
        as it runs (param_tree.place_layers, which does the same to params already loaded).
        `shardings` (unrolled layout, as above) shard the stacked arrays the same way.
      memory_limit: with offload, the bytes the model may hold: "1GB", "512MB", "2GiB" or an
        int (resident parts, KV cache, layers in flight, activations); the rest of the limit
        keeps layers resident. A request whose KV cache does not fit puts it on disk too.
      offload_folder: with offload="disk", where a KV cache too large for memory_limit goes
        (a temporary file, removed when generation ends; default: $TMPDIR or /tmp).
      config_overrides: other OPTConfig fields, e.g. scan_layers=True (parameters stacked
        along a leading layers axis), remat_policy, attention_impl.

    Returns:
      (config, params): `model_for(config).apply({"params": params}, ...)` runs it.

    Raises:
      CheckpointError: a tensor is missing, unexpected or of the wrong shape (named).
    """
    path = os.fspath(path)
    overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v}
    if architecture:
        overrides["architecture"] = architecture
    overrides.update(config_overrides)
    if offload is not None or memory_limit is not None or offload_folder is not None:
        if offload_folder is not None and offload != "disk":
            raise ValueError("offload_folder= is for offload='disk'")
        return _load_offloaded(
            path, offload, memory_limit, shardings, adapter, quantize, overrides, offload_folder
        )
    config, params = _load_base(path, shardings, quantize, overrides)
    if adapter is not None:  # QLoRA when quantised: the adapters go onto the quantised base
        config, params = peft.load_adapter(adapter, config, params)
    return config, params


def _load_offloaded(
    path, offload, memory_limit, shardings, adapter, quantize, overrides, folder=None
):
    if offload == "host":
        if memory_limit is not None or adapter is not None:
            given = "memory_limit" if memory_limit is not None else "adapter"
            raise ValueError(f"offload='host' does not combine with {given}")
        if overrides.get("scan_layers") is False:
            raise ValueError("offload='host' keeps the layers stacked: it needs scan_layers=True")
        overrides = {**overrides, "scan_layers": True, "layer_memory": "pinned_host"}
        return _load_base(path, shardings, quantize, overrides)
    if offload != "disk":
        raise ValueError(
            f"offload must be 'disk' (with memory_limit=) or 'host', got {offload!r}"
            if offload is not None
            else "memory_limit= is for offload='disk'"
        )
    if memory_limit is None:
        raise ValueError("offload='disk' needs memory_limit= (e.g. '1GB')")
    given = [n for n, v in (("shardings", shardings), ("adapter", adapter),
                            ("quantize", quantize)) if v is not None]  # fmt: skip
    if given:
        raise ValueError(f"offload='disk' does not combine with {', '.join(given)}")
    if os.path.isdir(os.path.join(path, orbax_io.PARAMS_DIR)):
        raise ValueError(
            f"offload='disk' reads HF directories (safetensors); {path} is an orbax export: "
            "convert it with scripts/convert.py --to hf"
        )
    config = OPTConfig.from_hf(path, **overrides)
    folder = None if folder is None else os.fspath(folder)
    return config, load_offloaded(path, config, memory_limit, folder)


def _load_base(path: str, shardings, quantize: str | None, overrides: dict):
    """The base weights of an HF directory or an orbax export, optionally quantised."""
    if os.path.isdir(os.path.join(path, orbax_io.PARAMS_DIR)):
        config, params = orbax_io.load_params(path, shardings, **overrides)
        if quantize is not None:  # orbax restores whole arrays: quantise after loading
            config, params = quantize_params(config, params, quantize)
        if config.layer_memory != "device":
            params = param_tree.place_layers(params, config.layer_memory)
        return config, params
    config = OPTConfig.from_hf(path, **overrides)
    root_is_decoder = config.architecture == "OPTModel"
    tensors = (
        (canonical_key(key, root_is_decoder), key, value)
        for file in weight_files(path)
        for key, value in iter_tensors(file)
    )
    if quantize is not None:
        check_method(config, quantize)
        if shardings is not None:
            raise ValueError("quantize= and shardings= together are not supported yet")
        config = config.replace(quantization=quantize)
    return config, _assemble(config, tensors, shardings, path)


def _assemble(config: OPTConfig, tensors, shardings, source: str) -> dict:
    """Places HF-named tensors into our parameter tree, checking every name and shape.

    Args:
      tensors: iterable of (HF name for config.architecture, the key as the file spells it,
        torch-layout array), consumed one at a time.
      shardings: None or a tree of target shardings (unrolled layout).
      source: the checkpoint's path, for error messages.
    """
    # Checkpoints are per layer: read into the unrolled layout, stack afterwards if scanning.
    # Quantised configs read float tensors and quantise each kernel as it arrives.
    method = config.quantization
    float_config = config.replace(scan_layers=False, quantization="none", layer_memory="device")
    expected = traverse_util.flatten_dict(abstract_params(float_config))
    by_name = {hf_name(p): (p, spec) for p, spec in expected.items()}
    root_is_decoder = config.architecture == "OPTModel"
    embed = ("decoder" if root_is_decoder else "model.decoder") + ".embed_tokens.weight"
    target_dtype = config.params_dtype
    flat_shardings = {} if shardings is None else traverse_util.flatten_dict(shardings)

    flat, unexpected = {}, []
    # layer_memory="pinned_host": each layer's tensors go into host arrays stacked over layers
    # ([L, ...], filled as the layers arrive), placed at the end (_place_stacked).
    stacked = {} if config.layer_memory != "device" else None

    def put(path, array, sharding):
        if stacked is not None and _layer_index(path) is not None:
            flat[path] = None  # seen; the array lives in `stacked`
            _stack_into(stacked, path, np.asarray(array), config.num_hidden_layers)
        else:  # a fresh host buffer (read, not mapped): device_put need not copy it again
            flat[path] = jax.device_put(array, sharding)

    for name, key, value in tensors:
        if name == TIED_LM_HEAD:
            want = by_name[embed][1].shape
            if tuple(value.shape) != tuple(want):
                raise CheckpointError(
                    f"tensor {key} has shape {tuple(value.shape)}, expected {tuple(want)}"
                )
            continue  # tied to embed_tokens
        if name not in by_name:
            unexpected.append(key)
            continue
        p, spec = by_name[name]
        if p in flat:
            raise CheckpointError(f"tensor {name} appears twice in the checkpoint (as {key})")
        array = from_hf_layout(p, value, spec.shape).astype(target_dtype, copy=False)
        if method != "none" and p[-1] == "kernel":
            n_out = len(spec.shape) - param_tree.num_in_axes(p)
            q, scale = quantize_kernel(array, n_out, config, "/".join(p[:-1]))
            del value, array
            put(p, q, None)
            put(p[:-1] + ("scale",), scale, None)
            continue
        put(p, array, flat_shardings.get(p))
        del value, array
    missing = sorted(hf_name(p) for p in expected if p not in flat)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing tensors: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
        raise CheckpointError(
            f"checkpoint in {source} does not match its {config.architecture} config: "
            + "; ".join(problems)
        )
    if stacked is not None:
        flat = {p: v for p, v in flat.items() if _layer_index(p) is None}
        flat.update(_place_stacked(stacked, flat_shardings, config.layer_memory))
        return traverse_util.unflatten_dict(flat)
    params = traverse_util.unflatten_dict(flat)
    if config.scan_layers:
        params = param_tree.stack_layers(params, config.num_hidden_layers)
    return params


def _layer_index(path: tuple[str, ...]) -> int | None:
    """i for a path inside decoder layer `layers_i` (unrolled layout), else None."""
    for name in path:
        if name.startswith("layers_"):
            return int(name[len("layers_") :])
    return None


def _stacked_path(path: tuple[str, ...]) -> tuple[str, ...]:
    return tuple("layers" if n.startswith("layers_") else n for n in path)


def _stack_into(stacked: dict, path: tuple[str, ...], array: np.ndarray, num_layers: int) -> None:
    """Writes one layer's array into the host array [L, ...] that stacks it over layers."""
    target = _stacked_path(path)
    if target not in stacked:
        stacked[target] = np.empty((num_layers, *array.shape), array.dtype)
    stacked[target][_layer_index(path)] = array


def _place_stacked(stacked: dict, flat_shardings: dict, memory_kind: str) -> dict:
    """The stacked layer arrays placed: Linear kernels in `memory_kind` memory (one-byte codes
    as 4-byte words, as param_tree.place_layers stores them), the rest on the device; each
    sharded as its unrolled sharding with a leading unsharded layers axis (one device when no
    shardings were given)."""
    layer0 = {_stacked_path(p): s for p, s in flat_shardings.items() if _layer_index(p) == 0}
    out = {}
    for path in list(stacked):
        array = stacked.pop(path)  # drop our reference as each is placed
        given = layer0.get(path)
        if given is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            spec = jax.sharding.PartitionSpec(None, *given.spec)
            sharding = jax.sharding.NamedSharding(given.mesh, spec)
        if param_tree.is_layer_kernel(path):
            array = param_tree.host_words(array)
            sharding = sharding.with_memory_kind(memory_kind)
        out[path] = jax.device_put(array, sharding)
    return out


def hf_state_dict(config: OPTConfig, params: dict) -> dict[str, np.ndarray]:
    """Our params -> {HF key: numpy array in torch layout} (the tied lm_head is not written)."""
    if config.lora_rank:
        raise CheckpointError(
            "the params hold LoRA adapters: merge them first (opt_jax.lora.merge) or save them "
            "as a PEFT adapter (opt_jax.checkpoints.peft.save_adapter)"
        )
    params = nn.unbox(params)  # flax's model.init(...)["params"] comes boxed
    if config.scan_layers:
        params, config = (
            param_tree.unstack_layers(params),
            config.replace(scan_layers=False, layer_memory="device"),
        )
    expected = traverse_util.flatten_dict(abstract_params(config))
    flat = traverse_util.flatten_dict(params)
    missing = sorted(hf_name(p) for p in expected if p not in flat)
    extra = sorted("/".join(p) for p in flat if p not in expected)
    if missing or extra:
        raise CheckpointError(f"params do not match the config: missing {missing}, extra {extra}")
    out = {}
    for p, value in flat.items():
        value = np.asarray(jax.device_get(value))
        if tuple(value.shape) != tuple(expected[p].shape):
            raise CheckpointError(
                f"param {'/'.join(p)} has shape {value.shape}, expected {expected[p].shape}"
            )
        out[hf_name(p)] = to_hf_layout(p, value)
    return out


def save_pretrained(
    path: str | os.PathLike, config: OPTConfig, params: dict, *, max_shard_bytes: int | None = None
) -> None:
    """Writes config.json + safetensors that `transformers` loads with identical logits.

    Shards into `model-0000i-of-0000n.safetensors` + index when the weights exceed
    `max_shard_bytes`. Files are written under temporary names and renamed at the end, so an
    interrupted save never leaves a half-written checkpoint behind a valid name.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    state = hf_state_dict(config, params)
    stored = {str(v.dtype) for v in state.values()}
    param_dtype = stored.pop() if len(stored) == 1 else config.param_dtype

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in state.items():
        if max_shard_bytes and size and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    if len(shards) == 1:
        names = [SAFE_WEIGHTS]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    written = []
    for name, shard in zip(names, shards, strict=True):
        tmp = os.path.join(path, name + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        written.append((tmp, os.path.join(path, name)))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": int(sum(v.nbytes for v in state.values()))},
            "weight_map": {k: n for n, shard in zip(names, shards, strict=True) for k in shard},
        }
        tmp = os.path.join(path, SAFE_INDEX + ".tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        written.append((tmp, os.path.join(path, SAFE_INDEX)))
    for tmp, final in written:
        os.replace(tmp, final)
    # Weights of an earlier save into this directory would shadow or mix with the new ones
    # (loaders prefer model.safetensors to an index): remove every one the new save did not write.
    current = {os.path.basename(final) for _, final in written}
    for name in os.listdir(path):
        stale = name in (SAFE_WEIGHTS, SAFE_INDEX) or _SAFE_SHARD.fullmatch(name)
        if stale and name not in current:
            os.remove(os.path.join(path, name))
    config.replace(param_dtype=param_dtype).save_hf(path)


# Names that moved out of this module (0.1's layout), still importable with a warning.
__getattr__ = moved(
    __name__,
    {
        "stack_layers": "opt_jax.param_tree",
        "unstack_layers": "opt_jax.param_tree",
        "_num_in_axes": "opt_jax.param_tree:num_in_axes",
    },
)
