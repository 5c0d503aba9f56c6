"""Calibration sequences from what users have: token stores, text files, or token arrays (.npy).

The papers draw 128 random 2048-token segments from C4 (GPTQ, SparseGPT) or 512 x 512 from the
Pile (SmoothQuant). Here a source is read into one token stream (each text file encoded as a
document with OPT's `</s>` prefix), and `nsamples` segments of `seq_len` tokens start at
seeded uniform random offsets; a 2-D .npy array is taken as the segments themselves.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from opt_jax.data.store import MANIFEST, TokenStore


def read_tokens(source: str, tokenizer=None):
    """The token ids of `source`: a token store directory (scripts/prepare_data.py, read
    memory-mapped, its tokenizer checked against `tokenizer`), comma-separated globs of text
    files (needs `tokenizer`), or one .npy file ([N, T] segments, or a 1-D stream)."""
    if os.path.isfile(os.path.join(source, MANIFEST)):
        store = TokenStore(source)
        if tokenizer is not None:
            store.check_tokenizer(tokenizer.fingerprint(), "the model's tokenizer")
        return store
    if source.endswith(".npy"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"calibration file {source} does not exist")
        return np.load(source, mmap_mode="r")
    paths = sorted({p for pattern in source.split(",") if pattern for p in glob.glob(pattern)})
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise FileNotFoundError(f"calibration source {source!r} matches no file")
    if tokenizer is None:
        raise ValueError("text calibration files need a tokenizer")
    stream = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            stream.extend(tokenizer.encode(f.read()))
    return np.asarray(stream, np.int32)


def sample_segments(tokens, nsamples: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """int32 [nsamples, seq_len]: segments of a token stream (1-D array or TokenStore) at seeded
    random offsets (a 2-D array is returned as it is)."""
    if isinstance(tokens, TokenStore):  # windows read from the memory-mapped shards
        length, read = tokens.num_tokens, tokens.tokens
    else:
        tokens = np.asarray(tokens)
        if tokens.ndim == 2:
            return tokens.astype(np.int32)
        if tokens.ndim != 1:
            raise ValueError(f"calibration tokens must be 1-D or [N, T], got {tokens.shape}")
        length, read = len(tokens), lambda start, stop: tokens[start:stop]
    if nsamples < 1 or seq_len < 1:
        raise ValueError(f"nsamples and seq_len must be positive, got {nsamples}, {seq_len}")
    if length < seq_len:
        raise ValueError(
            f"the calibration data holds {length} tokens, fewer than one sequence of {seq_len}"
        )
    starts = np.random.default_rng(seed).integers(0, length - seq_len + 1, size=nsamples)
    return np.stack([read(int(s), int(s) + seq_len) for s in starts]).astype(np.int32)
