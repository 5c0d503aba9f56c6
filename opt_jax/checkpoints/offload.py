"""Weights that stay on disk: `load_pretrained(path, offload="disk", memory_limit="1GB")`.

Reads an HF directory's safetensors files in place (published or written by save_pretrained):
the headers are read and checked at load, every tensor's bytes stay on disk. The embeddings, the
final LayerNorm and project_in/out are loaded (they serve every token); each decoder layer is
read when generation/streamed.py asks for it, with plain positioned reads into fresh buffers
(no memory map: its pages would count as the process's memory) in file order, and handed over
in torch layout: the layer program transposes and casts inside the compiled code.

The memory plan, per generate call: resident parts + the KV cache + two layers in flight (the
one computing, the one arriving) + one layer cast to the parameter dtype + activations of a
micro-batch + the logits must fit `memory_limit`; what is left keeps layers resident (first
layers first: every layer is read once per token, so any resident layer saves the same bytes).
A KV cache that does not fit goes to disk, layer by layer (generation/disk_cache.py), keeping
in memory the first layers' caches that fit (`DiskLayers.plan`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import threading
import time

import jax
import numpy as np
from flax import traverse_util

from opt_jax.checkpoints.hf_files import (
    TIED_LM_HEAD,
    TensorEntry,
    canonical_key,
    safetensors_entries,
    weight_files,
)
from opt_jax.checkpoints.hf_layout import CheckpointError, from_hf_layout, hf_name, hf_shape
from opt_jax.config import OPTConfig
from opt_jax.generation.disk_cache import aligned, pread_into
from opt_jax.generation.streamed import LayerSource, StreamPlan
from opt_jax.model import abstract_params

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_bytes(limit) -> int:
    """'1GB' (10^9), '1.5GiB' (2^30), '512MB', or an int number of bytes -> bytes."""
    if isinstance(limit, int | np.integer) and not isinstance(limit, bool):
        value = int(limit)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(limit))
        unit = match and match.group(2).upper()
        if not match or unit not in _UNITS:
            raise ValueError(
                f"memory_limit {limit!r} is not a size: write bytes or e.g. '1GB', '512MB', "
                "'1.5GiB'"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory_limit must be positive, got {limit!r}")
    return value


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@dataclasses.dataclass(frozen=True)
class _TorchLayer:
    """weights {name: torch-layout array} -> a decoder layer's params (our layout, param dtype).
    Hashable by value: it keys the compiled layer program."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # ("self_attn/q_proj/kernel", our shape)
    dtype: str

    def __call__(self, weights: dict) -> dict:
        flat = {}
        for name, shape in self.shapes:
            path = tuple(name.split("/"))
            flat[path] = from_hf_layout(path, weights[name], shape).astype(self.dtype)
        return traverse_util.unflatten_dict(flat)


class DiskLayers(LayerSource):
    """An OPTForCausalLM whose decoder layers stay in safetensors files (see the module
    docstring). Pass it to `opt_jax.generate` as the params.

    Attributes:
      config: the model's OPTConfig.
      resident: the parameters other than the layers, in memory.
      memory_limit: bytes this model may hold (weights, cache, activations).
      drop_page_cache: after each read, ask the kernel to drop the file's pages (what a model
        larger than RAM gets anyway; benchmarks use it to measure the disk).
      cache_folder: where a KV cache too large for the limit goes (a temporary file, removed
        when generation ends; None: the system's temporary directory, $TMPDIR).
      stats: bytes_read and read_seconds (every read), reads (layer fetches) so far; with the
        KV cache on disk, cache_bytes_read, cache_bytes_written and cache_seconds.
    """

    def __init__(
        self, path: str, config: OPTConfig, memory_limit, drop_page_cache=False, cache_folder=None
    ):
        self.path = path
        self.config = config
        self.memory_limit = parse_bytes(memory_limit)
        self.drop_page_cache = drop_page_cache
        self.cache_folder = cache_folder
        self.stats = {"bytes_read": 0, "reads": 0, "read_seconds": 0.0}
        self._lock = threading.Lock()
        self._layers, resident_entries, shapes = _index(path, config)
        self.to_layer_params = _TorchLayer(shapes, config.param_dtype)
        self._resident_layers: dict[int, dict] = {}
        self._buffers, self._turn = [None, None], 1  # the two buffers streamed layers alternate
        self.resident = self._read_resident(resident_entries)
        self.resident_bytes = sum(a.nbytes for a in jax.tree.leaves(self.resident))
        self.layer_bytes = max(sum(e.nbytes for _, e in layer) for layer in self._layers)
        count = sum(math.prod(s) for _, s in shapes)
        self.layer_cast_bytes = count * np.dtype(config.params_dtype).itemsize
        base = self.resident_bytes + 2 * self.layer_bytes + self.layer_cast_bytes
        if base > self.memory_limit:  # what any request needs, before its cache: fail at load
            raise ValueError(
                f"memory_limit {_size(self.memory_limit)} is too small for {path}: the resident "
                f"embeddings and head {_size(self.resident_bytes)} + two layers in flight and "
                f"one cast {_size(2 * self.layer_bytes + self.layer_cast_bytes)} need at least "
                f"{_size(base)}, plus each request's KV cache and activations"
            )

    def __repr__(self) -> str:
        return (
            f"DiskLayers({self.path!r}, {self.config.num_hidden_layers} layers of "
            f"{_size(self.layer_bytes)} on disk, memory_limit={_size(self.memory_limit)})"
        )

    # -- reading -----------------------------------------------------------------------------
    def _read(self, entries: list[TensorEntry], into: np.ndarray | None = None):
        """{key: array} of `entries`, read into fresh buffers, or into views of `into` (a
        64-byte aligned uint8 buffer: reusing one spares the page faults of fresh memory)."""
        out, used = {}, 0
        began = time.perf_counter()
        for path in sorted({e.path for e in entries}):
            fd = os.open(path, os.O_RDONLY)
            try:
                for e in sorted((e for e in entries if e.path == path), key=lambda e: e.offset):
                    if into is None:
                        array = aligned(e.shape, e.dtype)
                    else:
                        array = into[used : used + e.nbytes].view(e.dtype).reshape(e.shape)
                        used += -(-e.nbytes // 64) * 64
                    if not pread_into(fd, array, e.offset):
                        raise CheckpointError(f"{path} is truncated inside tensor {e.key}")
                    out[e.key] = array
                if self.drop_page_cache:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        with self._lock:
            self.stats["bytes_read"] += sum(e.nbytes for e in entries)
            self.stats["read_seconds"] += time.perf_counter() - began
        return out

    def _read_resident(self, entries: dict[tuple[str, ...], TensorEntry]) -> dict:
        arrays = self._read(list(entries.values()))
        flat = {}
        for p, e in entries.items():
            shape = _spec_shapes(self.config)[p]
            value = from_hf_layout(p, arrays.pop(e.key), shape).astype(self.config.params_dtype)
            flat[p] = jax.device_put(value)
        return traverse_util.unflatten_dict(flat)

    def fetch(self, i: int) -> dict:
        """Layer i's weights from disk: {name: torch-layout array}, as stored, in one of two
        buffers used in turn (valid until the fetch after next)."""
        with self._lock:
            self.stats["reads"] += 1
            turn = self._turn = 1 - self._turn
        if self._buffers[turn] is None:
            size = max(sum(-(-e.nbytes // 64) * 64 for _, e in layer) for layer in self._layers)
            self._buffers[turn] = aligned((size,), np.uint8)
        return self._load(i, self._buffers[turn])

    def _load(self, i: int, into=None) -> dict:
        arrays = self._read([e for _, e in self._layers[i]], into)
        # Aligned host arrays become CPU device arrays without a copy.
        weights = {name: jax.device_put(arrays.pop(e.key)) for name, e in self._layers[i]}
        return jax.block_until_ready(weights)

    def resident_layer(self, i: int) -> dict:
        if i not in self._resident_layers:
            self._resident_layers[i] = self._load(i)  # its own buffers, kept
        return self._resident_layers[i]

    # -- the memory plan ---------------------------------------------------------------------
    def _activations(self, rows: int, length: int, buffer_length: int) -> int:
        """A decoder layer's live activations for `rows` rows of `length` tokens (float32 upper
        bound: the input, residual, q / k / v and the attention output, fc1's output, scores)."""
        c = self.config
        per_token = 6 * c.hidden_size + c.ffn_dim + c.num_attention_heads * buffer_length
        return rows * length * per_token * 4

    def plan(self, batch: int, buffer_length: int, prompt_length: int) -> StreamPlan:
        """Micro-batches, resident layers and where the KV cache lives for a request, or a
        ValueError saying what the limit must be.

        The KV cache stays in memory when it fits beside the resident parts, two layers in
        flight, the logits and one row's activations. Otherwise it goes to disk layer by layer
        (generation/disk_cache.py: three one-layer regions of a micro-batch in memory at a
        time), all but the first layers' caches that still fit, and prefill and decode steps
        share one micro-batch size. Whatever is left keeps layers resident: a cached layer and
        a resident layer each save their bytes' read once per pass."""
        c = self.config
        itemsize = np.dtype(c.dtype).itemsize
        row_layer_cache = 2 * buffer_length * c.hidden_size * itemsize  # one row, one layer
        cache = c.num_hidden_layers * batch * row_layer_cache
        logits = batch * c.vocab_size * 4 * 2  # the head's output and the processors' copy
        streaming = 2 * self.layer_bytes + self.layer_cast_bytes
        base = self.resident_bytes + streaming + logits
        room = self.memory_limit - base
        one_row = self._activations(1, prompt_length, buffer_length)

        def largest(need) -> int:  # the most rows, in equal micro-batches, whose `need` fits
            rows = max((r for r in range(1, batch + 1) if need(r) <= room), default=0)
            return rows and -(-batch // -(-batch // rows))

        if cache + one_row <= room:  # the cache in memory
            room -= cache
            prefill = largest(lambda r: self._activations(r, prompt_length, buffer_length))
            decode = largest(lambda r: self._activations(r, 1, buffer_length))
            used = max(
                self._activations(prefill, prompt_length, buffer_length),
                self._activations(decode, 1, buffer_length),
            )
            on_disk = ()
        else:  # the cache on disk, but for the first layers' that fit
            slices = 3 * row_layer_cache  # per row: computing, arriving, being written back
            rows = largest(
                lambda r: self._activations(r, prompt_length, buffer_length) + r * slices
            )
            if not rows:
                raise ValueError(
                    f"memory_limit {_size(self.memory_limit)} is too small for this model and "
                    f"request: resident embeddings and head {_size(self.resident_bytes)} + two "
                    f"layers in flight and one cast {_size(streaming)} + logits {_size(logits)} "
                    f"+ activations {_size(one_row)} + three one-layer slices of the KV cache "
                    f"{_size(slices)} (the whole cache, {_size(cache)} for {batch} rows x "
                    f"{buffer_length} slots, on disk) need at least "
                    f"{_size(base + one_row + slices)}"
                )
            used = self._activations(rows, prompt_length, buffer_length) + rows * slices
            in_memory = min(c.num_hidden_layers - 1, (room - used) // (batch * row_layer_cache))
            used += in_memory * batch * row_layer_cache
            prefill = decode = rows
            on_disk = tuple(range(in_memory, c.num_hidden_layers))
        keep = min(c.num_hidden_layers, (room - used) // self.layer_bytes)
        resident = tuple(range(keep))
        for i in list(self._resident_layers):  # a larger request may take their room
            if i not in resident:
                del self._resident_layers[i]
        return StreamPlan(prefill, decode, resident, on_disk)


@functools.lru_cache(maxsize=8)
def _spec_shapes(config: OPTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {
        p: tuple(s.shape) for p, s in traverse_util.flatten_dict(abstract_params(config)).items()
    }


def _index(path: str, config: OPTConfig):
    """Reads the safetensors headers and matches every tensor to the model.

    Returns:
      (per layer a list of (name within the layer, TensorEntry), {our path: TensorEntry} of the
      resident parameters, the layer's (name, our shape) pairs).
    """
    files = weight_files(path)
    if not all(f.endswith(".safetensors") for f in files):
        raise CheckpointError(
            f"offload='disk' reads safetensors files, and {path} holds torch .bin files: "
            "convert it once with scripts/convert.py (it writes safetensors)"
        )
    specs = _spec_shapes(config)
    by_name = {hf_name(p): p for p in specs}
    layers: list[list] = [[] for _ in range(config.num_hidden_layers)]
    resident, seen, unexpected = {}, set(), []
    for file in files:
        for e in safetensors_entries(file):
            name = canonical_key(e.key, root_is_decoder=False)
            if name == TIED_LM_HEAD:
                continue  # tied to embed_tokens
            p = by_name.get(name)
            if p is None:
                unexpected.append(e.key)
                continue
            if p in seen:
                raise CheckpointError(f"tensor {name} appears twice in {path}")
            seen.add(p)
            if e.shape != hf_shape(p, specs[p]):
                raise CheckpointError(
                    f"tensor {e.key} has shape {e.shape}, the config expects "
                    f"{hf_shape(p, specs[p])}"
                )
            layer = p[2]
            if layer.startswith("layers_"):
                layers[int(layer[7:])].append(("/".join(p[3:]), e))
            else:
                resident[p] = e
    missing = sorted(hf_name(p) for p in specs if p not in seen)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint in {path} does not match its config: "
            + "; ".join(
                f"{what}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                for what, names in (("missing tensors", missing), ("unexpected", unexpected))
                if names
            )
        )
    shapes = tuple(sorted(("/".join(p[3:]), s) for p, s in specs.items() if p[2] == "layers_0"))
    return layers, resident, shapes


def load_offloaded(path: str, config: OPTConfig, memory_limit, cache_folder=None) -> DiskLayers:
    """`load_pretrained(..., offload="disk")`: checks the config streams, then indexes `path`."""
    problems = {
        "architecture": config.architecture != "OPTForCausalLM",
        "quantization": config.quantization != "none",
        "lora_rank": bool(config.lora_rank),
        "scan_layers": config.scan_layers,
    }
    bad = [name for name, yes in problems.items() if yes]
    if bad:
        raise ValueError(
            f"offload='disk' streams a float OPTForCausalLM with unrolled layers; this config "
            f"sets {', '.join(f'{n}={getattr(config, n)!r}' for n in bad)}"
        )
    if cache_folder is not None and not os.path.isdir(cache_folder):
        raise ValueError(f"offload_folder {cache_folder} is not a directory")
    return DiskLayers(path, config, memory_limit, cache_folder=cache_folder)
