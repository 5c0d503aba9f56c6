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


def tokenizer_source(config) -> str:
    """The tokenizer directory a run uses: data.tokenizer, else init_from's own tokenizer when
    fine-tuning (a freshly trained vocabulary would mean nothing to pretrained embeddings), else
    "" (train one on the training split)."""
    if config.data.tokenizer:
        return config.data.tokenizer
    if config.init_from:
        try:
            OPTTokenizer.from_pretrained(config.init_from)
        except FileNotFoundError as e:
            raise ValueError(
                f"init_from {config.init_from!r} has no tokenizer: fine-tuning needs the "
                "checkpoint's own vocabulary, pass --config.data.tokenizer=DIR"
            ) from e
        return config.init_from
    return ""


def _fingerprint(config) -> dict:
    """What the cached tokens depend on; a cache built from anything else is stale."""
    d = config.data
    tokenizer = tokenizer_source(config)
    fp = {"source": d.source, "jsonl_field": d.jsonl_field, "max_files": d.max_files,
          "eval_fraction": d.eval_fraction, "tokenizer": os.path.abspath(tokenizer) if tokenizer
          else ""}  # fmt: skip
    if tokenizer:
        fp["tokenizer_sha256"] = OPTTokenizer.from_pretrained(tokenizer).fingerprint()
    else:
        fp["vocab_size"] = d.vocab_size
    return fp


def prepare(config, workdir: str, model_vocab_size: int | None = None, resuming: bool = False):
    """Loads or builds the tokenizer and the tokenized splits, cached under WORKDIR/data.

    The cache records the data config it was built from (data/meta.json). A cache built from a
    different config is rebuilt, unless the run is resuming from a checkpoint (its model was
    trained on the cached tokens): then it is an error naming the changed fields.

    Returns:
      (tokenizer, train_tokens, eval_tokens)
    """
    data_dir = os.path.join(workdir, "data")
    tok_dir = os.path.join(data_dir, "tokenizer")
    meta_path = os.path.join(data_dir, "meta.json")
    train_path, eval_path = (os.path.join(data_dir, f"{s}.npy") for s in ("train", "eval"))
    import jax

    from opt_jax.sharding import sync

    # Process 0 builds the cache; the others wait for it and read it.
    if jax.process_index() != 0:
        sync("data-prepared")
    fingerprint = _fingerprint(config)
    cached = os.path.isfile(train_path) and os.path.isfile(eval_path) and os.path.isdir(tok_dir)
    if cached and os.path.isfile(meta_path):
        with open(meta_path) as f:
            built_from = json.load(f)
        changed = [
            f"{k}: {built_from.get(k)!r} -> {v!r}"
            for k, v in fingerprint.items()
            if built_from.get(k) != v
        ]
        if changed and resuming:
            raise ValueError(
                f"the data config changed since {workdir} was trained ({'; '.join(changed)}); "
                "resume with the original data settings or start a new workdir"
            )
        if changed:
            print(f"[data] config changed ({'; '.join(changed)}): rebuilding the cache", flush=True)
            cached = False
    elif cached and not resuming:
        cached = False  # built by an older version that kept no record: rebuild to be sure
    if cached:
        tokenizer = OPTTokenizer.from_pretrained(tok_dir)
        train_tokens, eval_tokens = np.load(train_path), np.load(eval_path)
    elif jax.process_index() == 0:
        docs = load_documents(config.data.source, config.data.jsonl_field, config.data.max_files)
        train_docs, eval_docs = split_documents(docs, config.data.eval_fraction)
        if fingerprint["tokenizer"]:
            tokenizer = OPTTokenizer.from_pretrained(fingerprint["tokenizer"])
        else:
            tokenizer = train_tokenizer((t for _, t in train_docs), config.data.vocab_size)
        train_tokens = tokenize(tokenizer, [t for _, t in train_docs])
        eval_tokens = tokenize(tokenizer, [t for _, t in eval_docs])
        os.makedirs(data_dir, exist_ok=True)
        if os.path.exists(meta_path):
            os.remove(meta_path)  # the record goes last: a crash mid-build leaves no valid cache
        tokenizer.save(tok_dir)
        for path, array in ((train_path, train_tokens), (eval_path, eval_tokens)):
            np.save(path + ".tmp.npy", array)
            os.replace(path + ".tmp.npy", path)  # never a half-written cache
        with open(meta_path + ".tmp", "w") as f:
            json.dump(fingerprint, f, indent=2)
        os.replace(meta_path + ".tmp", meta_path)
    else:  # pragma: no cover - other processes read what process 0 wrote
        tokenizer = OPTTokenizer.from_pretrained(tok_dir)
        train_tokens, eval_tokens = np.load(train_path), np.load(eval_path)
    if jax.process_index() == 0:
        sync("data-prepared")
    if model_vocab_size is not None:
        for name, tokens in (("training", train_tokens), ("evaluation", eval_tokens)):
            validate_token_ids(tokens[None, :], model_vocab_size, name=f"{name} tokens")
    return tokenizer, train_tokens, eval_tokens
