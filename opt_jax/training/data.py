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
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from opt_jax.data import Mixture, StoreError, TokenStore, parse_mixture
from opt_jax.data.store import MANIFEST, PLAN
from opt_jax.parallel.sharding import sync
from opt_jax.tasks.builtin import stdlib_files
from opt_jax.tokenizer import OPTTokenizer, train_tokenizer


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


class ArrayDataset:
    """Rows of equal-length arrays served by step: batch `step` is a pure function of
    (seed, step), drawn from a per-epoch permutation, each process taking its contiguous slice.

    Args:
      arrays: {name: [N, ...] array}, the same N for every name (e.g. input_ids [N, T] and
        labels [N]).
      global_batch: examples per step across all processes.
      seed: data-order seed.
    """

    def __init__(self, arrays: dict[str, np.ndarray], global_batch: int, seed: int):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"dataset arrays differ in length: {sizes}")
        self.arrays = arrays
        self.num_examples = next(iter(sizes.values()))
        if self.num_examples < 1:
            raise ValueError("the dataset has no examples")
        self.global_batch, self.seed = global_batch, seed
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
        return np.array(
            [self._permutation(int(e))[o] for e, o in zip(epochs, offsets, strict=True)]
        )

    def local_indices(self, step: int, process_index: int = 0, process_count: int = 1):
        if self.global_batch % process_count:
            raise ValueError(
                f"batch_size {self.global_batch} is not divisible by {process_count} processes"
            )
        local = self.global_batch // process_count
        return self.global_indices(step)[process_index * local : (process_index + 1) * local]

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """This process's slice of batch `step`: {name: [B_local, ...]}."""
        indices = self.local_indices(step, process_index, process_count)
        return {k: v[indices] for k, v in self.arrays.items()}

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.num_examples


class PackedDataset(ArrayDataset):
    """Non-overlapping `seq_len` windows of a token stream, served by step.

    Args:
      tokens: [num_tokens] int32 stream.
      seq_len: tokens per example.
      global_batch: examples per step across all processes.
      seed: data-order seed.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        num_examples = len(tokens) // seq_len
        if num_examples < 1:
            raise ValueError(
                f"the corpus has {len(tokens)} tokens: not one sequence of seq_len {seq_len}"
            )
        self.examples = tokens[: num_examples * seq_len].reshape(num_examples, seq_len)
        self.seq_len = seq_len
        super().__init__({"input_ids": self.examples}, global_batch, seed)

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """This process's slice of batch `step`: {"input_ids", "attention_mask"} [B_local, T]."""
        ids = self.examples[self.local_indices(step, process_index, process_count)]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


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


def _fingerprint(config, resuming: bool) -> tuple[dict, OPTTokenizer | None]:
    """What the cached tokens depend on; a cache built from anything else is stale. The
    tokenizer counts by content (sha256), its path is kept for information only. When resuming
    and the tokenizer can no longer be found (a moved init_from), it is left out: the cache's
    own copy is what the run uses.

    Returns:
      (fingerprint, the named tokenizer or None when one is to be trained or is unknown)
    """
    d = config.data
    fp = {"source": d.source, "jsonl_field": d.jsonl_field, "max_files": d.max_files,
          "eval_fraction": d.eval_fraction}  # fmt: skip
    try:
        tokenizer = tokenizer_source(config)
    except ValueError:
        if not resuming:
            raise
        return fp, None
    if not tokenizer:
        fp["vocab_size"] = d.vocab_size
        return fp, None
    loaded = OPTTokenizer.from_pretrained(tokenizer)
    fp["tokenizer"] = os.path.abspath(tokenizer)
    fp["tokenizer_sha256"] = loaded.fingerprint()
    return fp, loaded


_INFORMATIONAL = ("tokenizer",)  # recorded, never compared


def _build_or_check(config, data_dir: str, workdir: str, resuming: bool) -> None:
    """(Process 0.) Leaves a complete cache in data_dir that matches the config."""
    tok_dir, meta_path = os.path.join(data_dir, "tokenizer"), os.path.join(data_dir, "meta.json")
    marker = os.path.join(data_dir, "BUILDING")  # present while a build is under way
    arrays = [os.path.join(data_dir, f"{s}.npy") for s in ("train", "eval")]
    fingerprint, named_tokenizer = _fingerprint(config, resuming)
    complete = all(map(os.path.isfile, arrays)) and os.path.isdir(tok_dir)
    complete = complete and not os.path.exists(marker)
    if complete and os.path.isfile(meta_path):
        with open(meta_path) as f:
            built_from = json.load(f)
        changed = [
            f"{k}: {built_from.get(k)!r} -> {v!r}"
            for k, v in fingerprint.items()
            if k not in _INFORMATIONAL and built_from.get(k) != v
        ]
        if not changed:
            return
        if resuming:
            raise ValueError(
                f"the data config changed since {workdir} was trained ({'; '.join(changed)}); "
                "resume with the original data settings or start a new workdir"
            )
        print(f"[data] config changed ({'; '.join(changed)}): rebuilding the cache", flush=True)
    elif complete and resuming:
        return  # built by an older version that kept no record: the checkpoint was trained on it
    if "tokenizer_sha256" not in fingerprint and "vocab_size" not in fingerprint:
        raise ValueError(
            f"the data cache in {data_dir} is incomplete and its tokenizer cannot be found: "
            "pass --config.data.tokenizer"
        )
    docs = load_documents(config.data.source, config.data.jsonl_field, config.data.max_files)
    train_docs, eval_docs = split_documents(docs, config.data.eval_fraction)
    tokenizer = named_tokenizer or train_tokenizer(
        (t for _, t in train_docs), config.data.vocab_size
    )
    train_tokens = tokenize(tokenizer, [t for _, t in train_docs])
    eval_tokens = tokenize(tokenizer, [t for _, t in eval_docs])
    os.makedirs(data_dir, exist_ok=True)
    # A crash from here on leaves the marker behind, so the half-built cache is never taken.
    open(marker, "w").close()
    if os.path.exists(meta_path):
        os.remove(meta_path)
    tokenizer.save(tok_dir)
    for path, array in zip(arrays, (train_tokens, eval_tokens), strict=True):
        np.save(path + ".tmp.npy", array)
        os.replace(path + ".tmp.npy", path)
    with open(meta_path + ".tmp", "w") as f:
        json.dump(fingerprint, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)
    os.remove(marker)


def prepare(config, workdir: str, resuming: bool = False):
    """Loads or builds the tokenizer and the tokenized splits, cached under WORKDIR/data.

    The cache records the data config it was built from (data/meta.json). A cache built from a
    different config is rebuilt, unless the run is resuming from a checkpoint (its model was
    trained on the cached tokens): then it is an error naming the changed fields. Process 0
    checks and builds; every process then reads the cache (a shared filesystem).

    Returns:
      (tokenizer, train_tokens, eval_tokens)
    """
    import jax

    data_dir = os.path.join(workdir, "data")
    failure = None
    if jax.process_index() == 0:
        try:
            _build_or_check(config, data_dir, workdir, resuming)
        except Exception as e:  # reported after the barrier, which every process must reach
            failure = e
    sync("data-prepared")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(np.int32(failure is None))
        if not ok and failure is None:
            raise RuntimeError("process 0 failed to prepare the training data (see its log)")
    if failure is not None:
        raise failure
    tokenizer = OPTTokenizer.from_pretrained(os.path.join(data_dir, "tokenizer"))
    train_tokens, eval_tokens = (
        np.load(os.path.join(data_dir, f"{s}.npy")) for s in ("train", "eval")
    )
    return tokenizer, train_tokens, eval_tokens


# ---------------------------------------------------------------------------------------------
# Token stores (opt_jax.data): data.source=DIR or data.mixture=DIR_A:0.7,DIR_B:0.3
# ---------------------------------------------------------------------------------------------
def uses_stores(config) -> bool:
    """Whether the run reads token stores (data.mixture, or a data.source that is a store)."""
    d = config.data
    source = d.source
    is_store = os.path.isdir(source) and any(
        os.path.isfile(os.path.join(source, name)) for name in (MANIFEST, PLAN)
    )
    return bool(d.get("mixture")) or is_store


def store_datasets(config, verify: bool = True):
    """The tokenizer and the training / held-out Mixtures of a run on token stores.

    Held-out data: data.eval_source (a store) when set, else the last data.eval_fraction of
    every store's tokens (left out of training), mixed with the same weights. `verify` checks
    every shard's sha256 (process 0; the others check sizes only).

    Returns:
      (tokenizer, train Mixture, eval Mixture)

    Raises:
      StoreError: a missing or damaged store, weights that are not positive numbers, stores
        built with another tokenizer than the run's (one line, naming it).
    """
    d = config.data
    sources = parse_mixture(d.mixture) if d.get("mixture") else [(d.source, 1.0)]
    stores = []
    for directory, weight in sources:
        if not os.path.isdir(directory):
            raise StoreError(f"token store {directory} does not exist")
        stores.append((TokenStore(directory), weight))
    named = tokenizer_source(config)
    tokenizer = OPTTokenizer.from_pretrained(named or stores[0][0].tokenizer_dir)
    what = f"the run's tokenizer ({named})" if named else f"{stores[0][0].directory}'s tokenizer"
    eval_store = TokenStore(d.eval_source) if d.get("eval_source") else None
    for store in [s for s, _ in stores] + ([eval_store] if eval_store else []):
        store.check_tokenizer(tokenizer.fingerprint(), what)
        if verify:
            store.verify()
    if eval_store is not None:
        train_sources = stores
        eval_sources = [(eval_store, 1.0)]
    else:
        splits = [(s.split(d.eval_fraction), w) for s, w in stores]
        train_sources = [(head, w) for (head, _), w in splits]
        eval_sources = [(tail, w) for (_, tail), w in splits]
    train = Mixture(train_sources, config.seq_len, config.batch_size, config.seed)
    held_out = Mixture(eval_sources, config.seq_len, config.batch_size, config.seed + 1)
    return tokenizer, train, held_out
