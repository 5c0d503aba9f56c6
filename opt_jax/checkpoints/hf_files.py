"""The files of a Hugging Face OPT directory: which weight files it has, how their keys are
spelled, and their tensors read one at a time with numpy only (safetensors by plain reads; `.bin`
torch files by torch_reader.py, which never runs pickled code and needs no PyTorch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator

import numpy as np

from opt_jax.checkpoints import torch_reader
from opt_jax.checkpoints.hf_layout import CheckpointError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
_SAFE_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# The tied LM head: HF ties it to embed_tokens, the original facebook files omit it.
TIED_LM_HEAD = "lm_head.weight"


def canonical_key(key: str, root_is_decoder: bool) -> str:
    """Maps the key spellings users have onto our HF-style names.

    HF writes `model.decoder.*` for the head models; the original facebook/opt-* files and a bare
    OPTModel use `decoder.*`.
    """
    if root_is_decoder:
        return key[len("model.") :] if key.startswith("model.decoder.") else key
    return "model." + key if key.startswith("decoder.") else key


def weight_files(directory: str) -> list[str]:
    """The weight files of an HF directory, in transformers' order of preference: safetensors
    before torch files, a single file before a sharded index."""
    for index_name, single in ((SAFE_INDEX, SAFE_WEIGHTS), (TORCH_INDEX, TORCH_WEIGHTS)):
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path} has no weight_map")
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
            if missing:
                raise CheckpointError(f"{index_path} names shard files that are missing: {missing}")
            return [os.path.join(directory, name) for name in files]
    raise FileNotFoundError(
        f"no weights in {directory}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {TORCH_WEIGHTS} or "
        f"{TORCH_INDEX}"
    )


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a safetensors file lies: `nbytes` bytes from byte `offset` of
    `path`, to be read as `dtype` and reshaped to `shape` (torch layout)."""

    path: str
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def safetensors_entries(path: str) -> list[TensorEntry]:
    """The tensors of a safetensors file in file order, from its header alone (no data read).

    Raises:
      CheckpointError: an unsupported dtype, a malformed header, or a file shorter than its
        header says (truncated).
    """
    import ml_dtypes

    dtypes = dict(_SAFETENSORS_DTYPES, BF16=ml_dtypes.bfloat16)
    with open(path, "rb") as f:
        try:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        except (ValueError, MemoryError) as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
    header.pop("__metadata__", None)
    base, size = 8 + header_len, os.path.getsize(path)
    entries = []
    for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if info["dtype"] not in dtypes:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if base + end > size:
            raise CheckpointError(f"{path} is truncated inside tensor {key}")
        dtype = np.dtype(dtypes[info["dtype"]])
        entries.append(
            TensorEntry(path, key, dtype, tuple(info["shape"]), base + begin, end - begin)
        )
    return entries


def _read_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Reads a safetensors file tensor by tensor with plain reads into fresh buffers.

    (The safetensors library memory-maps the file; its resident pages then count as process
    memory on top of the loaded copy, doubling peak host memory for a whole checkpoint.)
    """
    with open(path, "rb") as f:
        for entry in safetensors_entries(path):
            count = entry.nbytes // entry.dtype.itemsize
            f.seek(entry.offset)
            array = np.fromfile(f, dtype=entry.dtype, count=count)
            if array.size != count:
                raise CheckpointError(f"{path} is truncated inside tensor {entry.key}")
            yield entry.key, array.reshape(entry.shape)


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) one tensor at a time from a safetensors or torch (.bin / .pt) file."""
    if path.endswith(".safetensors"):
        yield from _read_safetensors(path)
        return
    try:
        state = torch_reader.load(path)
    except torch_reader.TorchFileError as e:
        raise CheckpointError(str(e)) from e
    yield from _torch_state_tensors(state, path)


def _torch_state_tensors(state, path: str) -> Iterator[tuple[str, np.ndarray]]:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    for key in list(state):
        value = state.pop(key)  # drop each reference as we go: one tensor in memory at a time
        if not isinstance(value, torch_reader.TensorRef):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor ({value!r})")
        yield key, value.read()
