"""Training batches from one or more token stores, mixed by weight, as a pure function of
(seed, step).

  mix = opt_jax.data.Mixture([("c4_store", 0.7), ("code_store", 0.3)], seq_len=2048,
                             global_batch=256, seed=0)
  mix.batch(step, process_index, process_count)["input_ids"]   # int32 [256 / count, 2048]

A store is a stream of tokens (its documents, each starting with `</s>`), cut into
num_tokens // seq_len windows: its samples. Global row r of the run (r = step * B + i) is drawn
as follows.
  - Which store: rows come in blocks of `block_size` (1024); in every block each store has a
    fixed number of rows (its weight's share of the block, largest remainder), at seeded
    random positions. So proportions hold exactly per block, and how many rows store k gave
    before any row is a closed formula: no state, any step computable directly.
  - Which sample: store k's j-th row is sample `permute(j mod N_k)` of epoch j // N_k, a keyed
    Feistel permutation of its N_k samples (permutation.py) per (seed, store, epoch): a new
    order every epoch, no index array. A small store is repeated (a new epoch) when its share
    exhausts it; `metrics(steps)` says how many tokens and epochs each store has given.
Each process computes and reads only its contiguous slice of the global batch, memory-mapped:
memory does not grow with the stores.
"""

from __future__ import annotations

import math
import os

import numpy as np

from opt_jax.data.permutation import permute, round_keys
from opt_jax.data.store import StoreError, StoreSlice, TokenStore

BLOCK_SIZE = 1024
_MIX_TAG = 0x6D6978  # keys the block layouts apart from the per-store permutations


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """ "DIR_A:0.7,DIR_B:0.3" -> [(DIR_A, 0.7), (DIR_B, 0.3)]; a lone "DIR" has weight 1."""
    sources = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        directory, colon, weight = part.rpartition(":")
        if not colon or os.path.sep in weight:  # no weight given (or a ':' in a path)
            directory, weight = part, "1"
        try:
            value = float(weight)
        except ValueError:
            raise StoreError(
                f"mixture weight {weight!r} of {directory!r} is not a number"
            ) from None
        sources.append((directory, value))
    if not sources:
        raise StoreError(f"mixture {spec!r} names no store")
    return sources


def apportion(weights: list[float], total: int) -> np.ndarray:
    """Integer shares of `total` proportional to weights (largest remainder, ties to the first)."""
    w = np.asarray(weights, np.float64)
    exact = w / w.sum() * total
    shares = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[: total - shares.sum()]] += 1
    return shares


class Mixture:
    """Batches of `seq_len` windows from token stores mixed by weight (see the module doc).

    Args:
      sources: [(store directory or TokenStore, weight > 0)], e.g. parse_mixture's result.
      seq_len: T, tokens per row.
      global_batch: B, rows per step across all processes.
      seed: data-order seed.
      block_size: rows per mixing block.
    """

    def __init__(self, sources, seq_len: int, global_batch: int, seed: int = 0,
                 block_size: int = BLOCK_SIZE):  # fmt: skip
        if not sources:
            raise StoreError("a mixture needs at least one store")
        for directory, weight in sources:
            ok = isinstance(weight, int | float) and not isinstance(weight, bool)
            if not ok or not math.isfinite(weight) or weight <= 0:
                raise StoreError(
                    f"mixture weight of {directory!s} must be a positive number, got {weight!r}"
                )
        for name, value in (("seq_len", seq_len), ("global_batch", global_batch),
                            ("block_size", block_size)):  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise StoreError(f"{name} must be a positive integer, got {value!r}")
        self.stores = [
            s if isinstance(s, TokenStore | StoreSlice) else _open(s) for s, _ in sources
        ]
        self.names = _names([s.directory for s in self.stores])
        fingerprints = {s.tokenizer_fingerprint for s in self.stores}
        if len(fingerprints) > 1:
            raise StoreError(
                "the mixture's stores were built with different tokenizers: "
                + ", ".join(f"{s.directory} ({s.tokenizer_fingerprint[:12]})" for s in self.stores)
            )
        self.weights = [float(w) for _, w in sources]
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.block_size = block_size
        self.samples = [s.num_tokens // seq_len for s in self.stores]
        for store, n in zip(self.stores, self.samples, strict=True):
            if n < 1:
                raise StoreError(
                    f"token store {store.directory} holds {store.num_tokens} tokens, not one "
                    f"sequence of seq_len {seq_len}"
                )
        self.shares = apportion(self.weights, block_size)  # rows per block, per store
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- where each row comes from ----------------------------------------------------------
    def _layout(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(store of each slot [block_size], the slot's rank among its store's slots)."""
        if block not in self._layouts:
            slots = np.repeat(np.arange(len(self.stores)), self.shares)
            rng = np.random.default_rng([self.seed, _MIX_TAG, block])
            store = slots[rng.permutation(self.block_size)]
            rank = np.zeros(self.block_size, np.int64)
            for k in range(len(self.stores)):
                mine = store == k
                rank[mine] = np.arange(mine.sum())
            if len(self._layouts) > 4:
                self._layouts.clear()
            self._layouts[block] = (store, rank)
        return self._layouts[block]

    def rows_from(self, rows: int) -> np.ndarray:
        """[K] how many of the first `rows` global rows each store gave (closed form)."""
        blocks, rest = divmod(rows, self.block_size)
        counts = blocks * self.shares
        if rest:
            store, _ = self._layout(blocks)
            counts = counts + np.bincount(store[:rest], minlength=len(self.stores))
        return counts

    def epoch_of(self, steps: int) -> float:
        """Epochs of the first store after `steps` steps (training logs it as "epoch")."""
        return float(self.rows_from(steps * self.global_batch)[0] / self.samples[0])

    def metrics(self, steps: int) -> dict[str, float]:
        """What training logs after `steps` steps: tokens and epochs read from each store."""
        drawn = self.rows_from(steps * self.global_batch)
        out = {}
        for name, d, n in zip(self.names, drawn, self.samples, strict=True):
            out[f"tokens/{name}"] = int(d) * self.seq_len
            out[f"epochs/{name}"] = float(d / n)
        return out

    def sources_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(store [R], sample within it [R]) of global rows [R]."""
        rows = np.asarray(rows, np.int64)
        store = np.empty(rows.shape, np.int64)
        sample = np.empty(rows.shape, np.int64)
        for block in np.unique(rows // self.block_size):
            here = rows // self.block_size == block
            slot_store, slot_rank = self._layout(int(block))
            k = slot_store[rows[here] % self.block_size]
            j = block * self.shares[k] + slot_rank[rows[here] % self.block_size]  # k's j-th row
            store[here] = k
            for kk in np.unique(k):
                mine = k == kk
                n = self.samples[kk]
                epoch, position = np.divmod(j[mine], n)
                out = np.empty(mine.sum(), np.int64)
                for e in np.unique(epoch):
                    at = epoch == e
                    out[at] = permute(position[at], n, round_keys(self.seed, kk, e))
                sample[np.flatnonzero(here)[mine]] = out
        return store, sample

    # -- batches ----------------------------------------------------------------------------
    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """This process's slice of batch `step`: {"input_ids", "attention_mask"} int32
        [B / process_count, T]."""
        if self.global_batch % process_count:
            raise StoreError(
                f"batch_size {self.global_batch} is not divisible by {process_count} processes"
            )
        local = self.global_batch // process_count
        rows = step * self.global_batch + process_index * local + np.arange(local)
        store, sample = self.sources_of(rows)
        T = self.seq_len
        ids = np.stack([self.stores[k].tokens(s * T, (s + 1) * T)
                        for k, s in zip(store, sample, strict=True)])  # fmt: skip
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _names(directories: list[str]) -> list[str]:
    """Each store's name for metrics: its directory's base name, numbered when two share one."""
    names = [os.path.basename(os.path.normpath(d)) for d in directories]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _open(directory) -> TokenStore:
    if not os.path.isdir(directory):
        raise StoreError(f"mixture store {directory} does not exist")
    return TokenStore(directory)
