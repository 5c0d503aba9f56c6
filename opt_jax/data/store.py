"""The token store: a corpus tokenized once into flat, memory-mapped shards.

Layout of a store directory (written by opt_jax.data.prepare / scripts/prepare_data.py):

  manifest.json        written last, atomically: exists only when the store is complete.
                       Sources (paths, sizes, sha256), the tokenizer's fingerprint, the token
                       dtype, totals, and per shard its counts, sizes and sha256.
  plan.json            the settings and work units of the build (what a resumed build checks).
  tokenizer/           the tokenizer the store was built with (what training uses with it).
  shard-00000.bin      the tokens of a work unit's documents, concatenated: uint16 when the
                       vocabulary fits (OPT's 50,272 ids do), else uint32. Each document starts
                       with `</s>` (id 2), OPT's document separator.
  shard-00000.idx      int64 [documents + 1]: where each document starts in the .bin (in tokens),
                       and the shard's token count last.
  shard-00000.json     the unit's ledger entry, written after its .bin and .idx: a killed build
                       keeps every unit it finished.

Why flat files rather than TensorStore / ArrayRecord (levanter's and MaxText's): reading a
training window is one slice of a memory map, the OS page cache does the caching, and the
files are the Megatron/metaseq layout users already know; nothing needs a library to read.

Axis legend: D documents, N tokens.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os

import numpy as np

MANIFEST, PLAN, TOKENIZER_DIR = "manifest.json", "plan.json", "tokenizer"
FORMAT = "opt_jax-token-store"
VERSION = 1


class StoreError(ValueError):
    """A store that is incomplete, corrupted, or does not fit the run (one line, naming it)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65,536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_names(index: int) -> dict[str, str]:
    stem = f"shard-{index:05d}"
    return {"bin": stem + ".bin", "idx": stem + ".idx", "ledger": stem + ".json"}


def sha256_of(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class TokenStore:
    """A complete token store, memory-mapped (nothing is read until asked for).

      store = opt_jax.data.TokenStore("corpus_store")
      len(store), store.num_tokens, store.document(0)    # int32 ids, starting with </s> = 2
      store.tokens(start, stop)                          # the concatenated stream, any range

    Opening checks that every shard has the size the manifest records (a truncated file is an
    error naming it); `verify()` also checks their sha256.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        path = os.path.join(self.directory, MANIFEST)
        if not os.path.isfile(path):
            if os.path.isfile(os.path.join(self.directory, PLAN)):
                raise StoreError(
                    f"{self.directory} is not a complete token store (no {MANIFEST}): its build "
                    "was interrupted; run scripts/prepare_data.py again to finish it"
                )
            raise StoreError(f"{self.directory} is not a token store (no {MANIFEST})")
        with open(path) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{path} is not an {FORMAT} manifest")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shards = self.manifest["shards"]
        for i, shard in enumerate(self.shards):
            for kind, expected in (("bin", shard["bytes"]), ("idx", shard["index_bytes"])):
                file = os.path.join(self.directory, shard_names(i)[kind])
                size = os.path.getsize(file) if os.path.isfile(file) else None
                if size != expected:
                    found = "missing" if size is None else f"{size} bytes"
                    raise StoreError(
                        f"token store shard {file} is {found}, the manifest says {expected} "
                        "bytes: the store is truncated or damaged"
                    )
        docs = [s["num_documents"] for s in self.shards]
        tokens = [s["num_tokens"] for s in self.shards]
        self._doc_starts = np.concatenate([[0], np.cumsum(docs)]).astype(np.int64)
        self._token_starts = np.concatenate([[0], np.cumsum(tokens)]).astype(np.int64)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- what the store holds --------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["num_documents"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    def verify(self) -> None:
        """Checks every shard's sha256 against the manifest (reads the whole store)."""
        for i, shard in enumerate(self.shards):
            for kind, key in (("bin", "sha256"), ("idx", "index_sha256")):
                file = os.path.join(self.directory, shard_names(i)[kind])
                if sha256_of(file) != shard[key]:
                    raise StoreError(
                        f"token store shard {file} does not match the sha256 in its manifest: "
                        "the file is corrupted; rebuild the store"
                    )

    def split(self, fraction: float) -> tuple[StoreSlice, StoreSlice]:
        """(the stream's first 1 - fraction, its last `fraction`): a held-out tail, by tokens."""
        if not 0 < fraction < 1:
            raise StoreError(f"a held-out fraction must be in (0, 1), got {fraction!r}")
        cut = int(round(self.num_tokens * (1 - fraction)))
        return StoreSlice(self, 0, cut), StoreSlice(self, cut, self.num_tokens)

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.directory, TOKENIZER_DIR)

    def check_tokenizer(self, fingerprint: str, what: str = "this run's tokenizer") -> None:
        if fingerprint != self.tokenizer_fingerprint:
            raise StoreError(
                f"the token store {self.directory} was built with another tokenizer than "
                f"{what} (fingerprints {self.tokenizer_fingerprint[:12]} vs {fingerprint[:12]})"
            )

    # -- reading ---------------------------------------------------------------------------
    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._maps:
            names = shard_names(i)
            tokens = np.memmap(os.path.join(self.directory, names["bin"]), self.dtype, "r")
            offsets = np.memmap(os.path.join(self.directory, names["idx"]), np.int64, "r")
            self._maps[i] = (tokens, offsets)
        return self._maps[i]

    def document(self, i: int) -> np.ndarray:
        """Document i's token ids (int32), `</s>` first."""
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} of a store with {len(self)} documents")
        shard = bisect.bisect_right(self._doc_starts, i) - 1
        tokens, offsets = self._shard(shard)
        j = i - self._doc_starts[shard]
        return np.asarray(tokens[offsets[j] : offsets[j + 1]], np.int32)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole store's stream (documents in order), int32."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) of a store with {self.num_tokens}")
        pieces = []
        shard = bisect.bisect_right(self._token_starts, start) - 1
        while start < stop:
            tokens, _ = self._shard(shard)
            base = self._token_starts[shard]
            end = min(stop, self._token_starts[shard + 1])
            pieces.append(tokens[start - base : end - base])
            start, shard = end, shard + 1
        return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)


class StoreSlice:
    """Tokens [start, stop) of a store's stream, read like a store (what Mixture needs)."""

    def __init__(self, store: TokenStore, start: int, stop: int):
        self.store, self.start, self.stop = store, start, stop
        self.directory = store.directory
        self.tokenizer_fingerprint = store.tokenizer_fingerprint

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start

    def tokens(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) of a slice of {self.num_tokens}")
        return self.store.tokens(self.start + start, self.start + stop)
