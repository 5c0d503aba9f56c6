"""A KV cache on disk for layer-streamed generation (generation/streamed.py), when the cache of a
large batch is the larger part of what a model needs.

Axis legend: R rows of a micro-batch, N heads, L buffer length (slots), H head size.

The keys and values of the layers the memory plan puts on disk live in one unlinked temporary
file (nothing is left behind, whatever happens to the process), one region per (layer,
micro-batch): keys then values, each [R, N, L, H] as the layer program takes them. A region starts
as zeros (a sparse file), as an empty in-memory cache does. Before a micro-batch runs a layer, its
region is read whole (the attention reads every slot); afterwards only the slots the pass wrote
go back (the prompt's at the prefill, one per decode step). One background thread does both, in
the order they were asked for, so a region is always written back before its next read, and it
reads one region ahead while the current one computes: at most three regions are in memory (the
one computing, the one arriving, the one being written back).
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np


def aligned(shape, dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an `alignment`-byte boundary: jax then
    takes it as a CPU device array without copying (an unaligned one is copied, ~1 ms per MB)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def pread_into(fd: int, array: np.ndarray, offset: int) -> bool:
    """Fills the contiguous `array` with the file's bytes from `offset`; False if the file ends
    first."""
    view, done, nbytes = memoryview(array.reshape(-1).view(np.uint8)), 0, array.nbytes
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            return False
        done += got
    return True


def pwrite_all(fd: int, array: np.ndarray, offset: int) -> int:
    """Writes the contiguous `array` at `offset`, however many calls it takes (a short write
    is retried; an error such as a full disk raises)."""
    view, done = memoryview(array.reshape(-1).view(np.uint8)), 0
    while done < len(view):
        got = os.pwrite(fd, view[done:], offset + done)
        if got == 0:
            raise OSError(f"the KV cache file took no bytes at offset {offset + done}")
        done += got
    return done


class DiskKVCache:
    """Keys and values of `layers` for micro-batches of `rows` rows each, on disk (see the
    module docstring).

    Args:
      layers: the decoder layers whose cache is on disk (the others stay in memory).
      rows: each micro-batch's row count, in order.
      shape: (N, L, H) of one row's keys (and values) in one layer.
      dtype: the cache's dtype.
      folder: where the temporary file goes (None: the system's temporary directory).
      drop_page_cache: after each read, ask the kernel to drop the region's pages.
    """

    def __init__(self, layers, rows, shape, dtype, folder=None, drop_page_cache=False):
        self.layers = tuple(layers)
        self.rows = tuple(rows)
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.drop_page_cache = drop_page_cache
        self.stats = {"bytes_read": 0, "bytes_written": 0, "seconds": 0.0}
        self._lock = threading.Lock()
        self._offsets, end = {}, 0
        for i in self.layers:
            for n, r in enumerate(self.rows):
                self._offsets[i, n] = end
                end += 2 * self._bytes(r)
        self._file = tempfile.TemporaryFile(dir=folder, prefix="opt_jax-kv-")
        try:
            os.ftruncate(self._file.fileno(), end)  # zeros, taking no disk until written
        except OSError as e:
            self._file.close()
            raise OSError(
                f"cannot make a {end / 1e9:.2f} GB KV cache file in "
                f"{folder or tempfile.gettempdir()}: {e}"
            ) from e
        self._fd = self._file.fileno()
        self._order = [(i, n) for i in self.layers for n in range(len(self.rows))]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="opt_jax-kv")
        self._pending: dict[tuple[int, int], Future] = {}
        self._writes: list[Future] = []

    def _bytes(self, rows: int) -> int:
        return rows * math.prod(self.shape) * self.dtype.itemsize

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers

    # -- in the background thread ----------------------------------------------------------------
    def _read(self, i: int, n: int):
        began = time.perf_counter()
        size, offset = self._bytes(self.rows[n]), self._offsets[i, n]
        both = aligned((2, self.rows[n], *self.shape), self.dtype)
        if not pread_into(self._fd, both, offset):
            raise OSError(f"the KV cache file ended inside layer {i}'s region")
        if self.drop_page_cache:
            os.posix_fadvise(self._fd, offset, 2 * size, os.POSIX_FADV_DONTNEED)
        key, value = jax.device_put(both[0]), jax.device_put(both[1])  # no copy: aligned
        with self._lock:
            self.stats["bytes_read"] += 2 * size
            self.stats["seconds"] += time.perf_counter() - began
        return jax.block_until_ready((key, value))

    def _write(self, i: int, n: int, key, value, start: int, count: int) -> None:
        """Slots [start, start + count) of every row and head, from the layer's outputs."""
        began = time.perf_counter()
        heads, length, head = self.shape
        item, size = self.dtype.itemsize, self._bytes(self.rows[n])
        written = 0
        for part, array in enumerate((key, value)):
            array = np.asarray(array)
            base = self._offsets[i, n] + part * size
            if start == 0 and count == length:  # the whole region at once
                written += pwrite_all(self._fd, array, base)
                continue
            for r in range(array.shape[0]):
                for h in range(heads):
                    at = base + ((r * heads + h) * length + start) * head * item
                    written += pwrite_all(self._fd, array[r, h, start : start + count], at)
        with self._lock:
            self.stats["bytes_written"] += written
            self.stats["seconds"] += time.perf_counter() - began

    # -- from the compute thread -----------------------------------------------------------------
    def take(self, i: int, n: int):
        """(keys, values) [R, N, L, H] of layer i, micro-batch n (waits for its read)."""
        self._check_writes()
        future = self._pending.pop((i, n), None) or self._pool.submit(self._read, i, n)
        return future.result()

    def ahead(self, i: int, n: int) -> None:
        """Starts reading the region after (i, n), cyclically (the next pass's first region is
        read while this pass's last computes). Not when that is (i, n) itself: its read must
        follow its write-back."""
        at = self._order.index((i, n))
        nxt = self._order[(at + 1) % len(self._order)]
        if nxt != (i, n) and nxt not in self._pending:
            self._pending[nxt] = self._pool.submit(self._read, *nxt)

    def put(self, i: int, n: int, key, value, start: int, count: int) -> None:
        """Writes back the slots a pass wrote (in the background, before any later read)."""
        self._writes.append(self._pool.submit(self._write, i, n, key, value, start, count))

    def _check_writes(self) -> None:
        """Raises the error of a failed write-back (a full disk, say) at the next step."""
        done = [f for f in self._writes if f.done()]
        self._writes = [f for f in self._writes if not f.done()]
        for future in done:
            future.result()

    def close(self) -> None:
        """Waits for the writes, drops reads not taken, removes the file; raises a write's
        error."""
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()
        self._file.close()
        self._check_writes()
