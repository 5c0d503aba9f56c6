"""Corpus -> tokens -> packed fixed-length sequences -> deterministic, resumable batches.

Documents are tokenized once, each prefixed with `</s>` (OPT's document separator and prompt
prefix), concatenated and cut into non-overlapping sequences of `seq_len` tokens. Batch `step`
is a pure function of (seed, step): the global example indices come from a per-epoch
permutation, and each process takes its contiguous slice of the global batch. So the iterator
position is just the step number saved in the checkpoint, and a resumed run sees exactly the
batches an uninterrupted one would. (grain offers the same through checkpointable iterators;
for an in-memory token array an index function is simpler and exact.)
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from opt_jax.tokenizer import OPTTokenizer, train_tokenizer
from opt_jax.validation import validate_token_ids


def stdlib_files() -> list[Path]:
    """The Python standard library's own sources: real text present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def load_documents(
    source: str, jsonl_field: str = "text", max_files: int = 0
) -> list[tuple[str, str]]:
    """(name, text) documents from "stdlib", comma-separated globs, or .jsonl files.

    Raises:
      ValueError: when the source matches no file or yields no text.
    """
    if source == "stdlib":
        paths = stdlib_files()
    else:
        paths = []
        for pattern in source.split(","):
            matched = sorted(glob.glob(os.path.expanduser(pattern.strip()), recursive=True))
            if not matched:
                raise ValueError(f"data source pattern {pattern.strip()!r} matches no file")
            paths += [Path(p) for p in matched if os.path.isfile(p)]
    if max_files:
        paths = paths[:max_files]
    docs = []
    for path in paths:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8", errors="replace") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if jsonl_field not in record:
                        raise ValueError(f"{path}:{i + 1} has no field {jsonl_field!r}")
                    docs.append((f"{path}:{i + 1}", str(record[jsonl_field])))
        else:
            docs.append((str(path), path.read_text(encoding="utf-8", errors="replace")))
    docs = [(name, text) for name, text in docs if text.strip()]
    if not docs:
        raise ValueError(f"data source {source!r} yields no text (an empty corpus)")
    return docs


def split_documents(docs, eval_fraction: float):
    """Held-out split by document (file), stable under reordering: a hash of the name decides."""

    def held_out(name: str) -> bool:
        digest = hashlib.sha256(name.encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64 < eval_fraction

    train = [d for d in docs if not held_out(d[0])]
    evaluation = [d for d in docs if held_out(d[0])]
    if not train or not evaluation:
        raise ValueError(
            f"eval_fraction {eval_fraction} leaves {len(train)} training and {len(evaluation)} "
            f"evaluation documents out of {len(docs)}; both must be non-empty"
        )
    return train, evaluation


def tokenize(tokenizer: OPTTokenizer, texts: Sequence[str]) -> np.ndarray:
    """Documents -> one int32 stream, each document prefixed with `</s>` (id 2)."""
    encodings = tokenizer._tok.encode_batch(list(texts), add_special_tokens=False)
    pieces = []
    for enc in encodings:
        pieces.append(np.array([tokenizer.eos_token_id], np.int32))
        pieces.append(np.asarray(enc.ids, np.int32))
    return np.concatenate(pieces)


class PackedDataset:
    """Non-overlapping `seq_len` windows of a token stream, served by step.

    Args:
      tokens: [num_tokens] int32 stream.
      seq_len: tokens per example.
      global_batch: examples per step across all processes.
      seed: data-order seed.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        self.num_examples = len(tokens) // seq_len
        if self.num_examples < 1:
            raise ValueError(
                f"the corpus has {len(tokens)} tokens: not one sequence of seq_len {seq_len}"
            )
        self.examples = tokens[: self.num_examples * seq_len].reshape(self.num_examples, seq_len)
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self._perm_cache: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache = {epoch: rng.permutation(self.num_examples)}
        return self._perm_cache[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        """[global_batch] example indices of batch `step`."""
        flat = step * self.global_batch + np.arange(self.global_batch)
        epochs, offsets = np.divmod(flat, self.num_examples)
        return np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets)])

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """This process's slice of batch `step`: {"input_ids", "attention_mask"} [B_local, T]."""
        if self.global_batch % process_count:
            raise ValueError(
                f"batch_size {self.global_batch} is not divisible by {process_count} processes"
            )
        local = self.global_batch // process_count
        indices = self.global_indices(step)[process_index * local : (process_index + 1) * local]
        ids = self.examples[indices]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.num_examples


def prepare(config, workdir: str, model_vocab_size: int | None = None):
    """Loads or builds the tokenizer and the tokenized splits, cached under WORKDIR/data.

    Returns:
      (tokenizer, train_tokens, eval_tokens)
    """
    data_dir = os.path.join(workdir, "data")
    tok_dir = os.path.join(data_dir, "tokenizer")
    train_path, eval_path = (os.path.join(data_dir, f"{s}.npy") for s in ("train", "eval"))
    import jax

    from opt_jax.sharding import sync

    # Process 0 builds the cache; the others wait for it and read it.
    if jax.process_index() != 0:
        sync("data-prepared")
    if os.path.isfile(train_path) and os.path.isfile(eval_path) and os.path.isdir(tok_dir):
        tokenizer = OPTTokenizer.from_pretrained(tok_dir)
        train_tokens, eval_tokens = np.load(train_path), np.load(eval_path)
    else:
        docs = load_documents(config.data.source, config.data.jsonl_field, config.data.max_files)
        train_docs, eval_docs = split_documents(docs, config.data.eval_fraction)
        if config.data.tokenizer:
            tokenizer = OPTTokenizer.from_pretrained(config.data.tokenizer)
        else:
            tokenizer = train_tokenizer((t for _, t in train_docs), config.data.vocab_size)
        train_tokens = tokenize(tokenizer, [t for _, t in train_docs])
        eval_tokens = tokenize(tokenizer, [t for _, t in eval_docs])
        os.makedirs(data_dir, exist_ok=True)
        tokenizer.save(tok_dir)
        for path, array in ((train_path, train_tokens), (eval_path, eval_tokens)):
            np.save(path + ".tmp.npy", array)
            os.replace(path + ".tmp.npy", path)  # never a half-written cache
    if jax.process_index() == 0:
        sync("data-prepared")
    if model_vocab_size is not None:
        for name, tokens in (("training", train_tokens), ("evaluation", eval_tokens)):
            validate_token_ids(tokens[None, :], model_vocab_size, name=f"{name} tokens")
    return tokenizer, train_tokens, eval_tokens
