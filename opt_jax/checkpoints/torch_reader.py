"""Reads PyTorch checkpoint files (`torch.save`'s zip format) with numpy only: no PyTorch, no
pickled code executed, one tensor in host memory at a time.

A torch file is a zip archive holding `<prefix>/data.pkl` (a pickle of the saved object, in
which each tensor is a call to `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` and each storage a persistent id `("storage", <dtype class>, key, device,
numel)`) and one uncompressed entry `<prefix>/data/<key>` per storage with its raw
little-endian bytes. We unpickle with an allowlist: tensors become `TensorRef`s that read
their bytes on demand; any other class (an optimizer state, metaseq's `cfg`) becomes an inert
`Opaque` record of its arguments, so unpickling can never run code from the file.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# torch.<Name>Storage -> numpy dtype (UntypedStorage holds raw bytes).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


class TorchFileError(ValueError):
    """The file is not a readable torch checkpoint (names the file and the problem)."""


class Opaque:
    """Stands in for any class the allowlist does not know; keeps what the pickle said of it."""

    args: tuple = ()
    kwargs: dict = {}
    state: Any = None

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"Opaque({type(self).__qualname__})"


class _Sealed:
    """Built only by the unpickler's own code: a BUILD opcode in the file must not rewrite the
    geometry that was checked (pickle would otherwise update the instance's attributes)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise TorchFileError(f"the file tries to modify a {type(self).__name__} after building it")


class _StorageRef(_Sealed):
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, np.dtype(dtype), int(numel)


class TensorRef(_Sealed):
    """A tensor not read yet: `read()` returns it as a fresh numpy array."""

    __slots__ = ("_reader", "_storage", "offset", "shape", "stride")

    def __init__(self, reader: TorchFile, storage: _StorageRef, offset: int, shape, stride):
        self._reader, self._storage = reader, storage
        try:
            self.offset = int(offset)
            self.shape = tuple(int(n) for n in shape)
            self.stride = tuple(int(n) for n in stride)
        except (TypeError, ValueError) as e:
            raise TorchFileError(f"{reader.path}: malformed tensor view {shape} / {stride}") from e
        self._check()

    def _check(self) -> None:
        # Views are rebuilt with as_strided: only in-bounds, non-negative geometry may pass.
        path = self._reader.path
        if not isinstance(self._storage, _StorageRef):
            raise TorchFileError(f"{path}: a tensor without a storage")
        if len(self.shape) != len(self.stride) or self.offset < 0:
            raise TorchFileError(f"{path}: malformed tensor view {self.shape} / {self.stride}")
        if any(n < 0 for n in self.shape) or any(n < 0 for n in self.stride):
            raise TorchFileError(f"{path}: negative size or stride in {self.shape} / {self.stride}")

    @property
    def dtype(self) -> np.dtype:
        return self._storage.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def read(self) -> np.ndarray:
        """The tensor's values in a new C-contiguous array."""
        self._check()  # again, right before memory is touched
        if self.size == 0:
            return np.zeros(self.shape, self.dtype)
        # Elements of the storage this view touches: [offset, offset + span).
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        if self.offset + span > self._storage.numel:
            raise TorchFileError(
                f"{self._reader.path}: a tensor of shape {self.shape} reaches past the end of "
                f"storage {self._storage.key} ({self._storage.numel} elements)"
            )
        flat = self._reader.read_storage(self._storage, self.offset, span)
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat, self.shape, tuple(s * itemsize for s in self.stride)
        )
        if span == self.size and view.flags.c_contiguous:
            return flat.reshape(self.shape)  # the fresh buffer is already the tensor
        return np.array(view, order="C")  # transposed or strided views: one compact copy

    def __repr__(self):
        return f"TensorRef(shape={self.shape}, dtype={self.dtype})"


class TorchFile:
    """An open torch zip checkpoint. `load()` returns the unpickled object with TensorRefs."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not zipfile.is_zipfile(self.path):
            raise TorchFileError(
                f"{self.path} is not a zip-format torch file (saved by torch < 1.6 or not a torch "
                "file at all); re-save it with a recent torch.save or convert it to safetensors"
            )
        with zipfile.ZipFile(self.path) as zf:
            self._entries = {info.filename: info for info in zf.infolist()}
        pickles = [name for name in self._entries if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise TorchFileError(f"{self.path}: expected one */data.pkl entry, found {pickles}")
        self._prefix = pickles[0][: -len("data.pkl")]
        order = self._entries.get(self._prefix + "byteorder")
        self._big_endian = order is not None and self._read_entry(order) == b"big"

    def _read_entry(self, info: zipfile.ZipInfo) -> bytes:
        with zipfile.ZipFile(self.path) as zf:
            return zf.read(info)

    def load(self) -> Any:
        data = self._read_entry(self._entries[self._prefix + "data.pkl"])
        try:
            return _Unpickler(io.BytesIO(data), self).load()
        except TorchFileError:
            raise
        except Exception as e:  # a malformed pickle: say which file, whatever broke
            raise TorchFileError(f"{self.path}: unreadable pickle ({type(e).__name__}: {e})") from e

    def read_storage(self, storage: _StorageRef, offset: int, count: int) -> np.ndarray:
        """Elements [offset, offset + count) of a storage, read into a fresh buffer."""
        name = f"{self._prefix}data/{storage.key}"
        info = self._entries.get(name)
        if info is None:
            raise TorchFileError(f"{self.path}: storage entry {name} is missing")
        itemsize = storage.dtype.itemsize
        if info.file_size < (offset + count) * itemsize:
            raise TorchFileError(f"{self.path}: storage entry {name} is truncated")
        if info.compress_type == zipfile.ZIP_STORED:  # torch.save writes storages uncompressed
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                header = f.read(30)
                if header[:4] != b"PK\x03\x04":
                    raise TorchFileError(f"{self.path}: bad zip header for {name}")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len + offset * itemsize)
                array = np.fromfile(f, dtype=storage.dtype, count=count)
        else:
            raw = self._read_entry(info)[offset * itemsize : (offset + count) * itemsize]
            array = np.frombuffer(raw, dtype=storage.dtype).copy()
        if array.size != count:
            raise TorchFileError(f"{self.path}: storage entry {name} is truncated")
        return array.byteswap() if self._big_endian else array


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data  # an nn.Parameter is its data for our purposes


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, reader: TorchFile):
        super().__init__(file)
        self._reader = reader

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch._utils" and name in (
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
        ):
            return _rebuild_parameter
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):  # tensor subclasses
            return self._rebuild_from_type
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch", "Size"):
            return tuple
        # Anything else (optimizer state, configs, user classes) becomes an inert record.
        return type(name, (Opaque,), {"__module__": f"opaque.{module}"})

    def _rebuild_tensor(self, storage, storage_offset, size, stride, *unused):
        return TensorRef(self._reader, storage, storage_offset, size, stride)

    def _rebuild_from_type(self, func, new_type, args, state=None):
        # Only our own tensor rebuilders may be called here, never a callable from the file.
        if func not in (self._rebuild_tensor, _rebuild_parameter):
            raise TorchFileError(f"{self._reader.path}: unsupported tensor rebuild {func!r}")
        return func(*args)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 5):
            raise TorchFileError(f"{self._reader.path}: unknown persistent id {pid!r}")
        _, dtype, key, _location, numel = pid[:5]
        if not isinstance(dtype, type) or not issubclass(dtype, np.generic):
            raise TorchFileError(f"{self._reader.path}: unsupported storage type {dtype!r}")
        if int(numel) < 0:
            raise TorchFileError(f"{self._reader.path}: storage {key} has negative size {numel}")
        return _StorageRef(str(key), dtype, int(numel))


def load(path: str | os.PathLike) -> Any:
    """Unpickles a torch file: tensors come back as TensorRef (call .read()), unknown classes as
    Opaque records, nothing executed."""
    return TorchFile(path).load()
