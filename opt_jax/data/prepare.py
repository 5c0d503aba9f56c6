"""Building a token store (store.py) from text corpora, in parallel, resumably.

  opt_jax.data.prepare_store("c4/*.jsonl.zst,wiki/*.txt", "opt-125m/", "store/", workers=8)
  python scripts/prepare_data.py --source 'c4/*.jsonl.zst' --tokenizer opt-125m --out store

Sources, by file name (comma-separated globs, matched files sorted):
  *.jsonl, *.jsonl.gz, *.jsonl.zst   one document per line, its `text_field`
  *.parquet                          one document per row of the `text_field` column
  *.arrow                            a Hugging Face `datasets` cache file (Arrow stream), the same
  anything else                      a text file is one document
Each document is tokenized with OPT's contract: `</s>` (id 2) and then its ids.

Determinism: the work is cut into units that depend only on the sources (plain .jsonl files are
split at the first line break after every `chunk_bytes`; consecutive text files are grouped up to
`chunk_bytes`; compressed, Parquet and Arrow files are one unit each), and unit i becomes shard
i. Workers only decide which process writes a shard, so any number of workers writes the same
bytes. A unit's shard is written under temporary names and committed by its ledger entry
(shard-i.json) last; a killed build keeps the units it finished and the next run does the
rest (the plan must be the same: same sources, tokenizer and field). manifest.json comes last.

Invalid UTF-8 is replaced (U+FFFD) and counted per document; the first place is reported.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
from collections.abc import Iterator

import numpy as np

from opt_jax.data.store import (
    FORMAT,
    MANIFEST,
    PLAN,
    TOKENIZER_DIR,
    VERSION,
    StoreError,
    sha256_of,
    shard_names,
    token_dtype,
)
from opt_jax.tokenizer import OPTTokenizer

CHUNK_BYTES = 64 << 20  # a work unit holds about this much text
# Documents tokenized per encode_batch call: at most this many, and at most this much text (a
# batch's Encoding objects take tens of times its text: 1,024 long files took 1.5 GB).
ENCODE_BATCH, ENCODE_CHARS = 1024, 1 << 20


# ---------------------------------------------------------------------------------------------
# Sources and work units
# ---------------------------------------------------------------------------------------------
def _kind(path: str) -> str:
    name = path.lower()
    for kind in ("jsonl.gz", "jsonl.zst", "jsonl", "parquet", "arrow"):
        if name.endswith("." + kind):
            return kind
    return "text"


def match_sources(source: str) -> list[str]:
    """The files of comma-separated globs, sorted; a glob that matches no file is an error."""
    paths = set()
    for pattern in (p.strip() for p in source.split(",")):
        if not pattern:
            continue
        matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p)]  # fmt: skip
        if not matched:
            raise StoreError(f"source pattern {pattern!r} matches no file")
        paths.update(matched)
    if not paths:
        raise StoreError(f"--source {source!r} names no file")
    return sorted(paths)


def plan_units(paths: list[str], chunk_bytes: int = CHUNK_BYTES) -> list[dict]:
    """Work units: {"files": [(path, start byte, end byte or None)], "kind"} in store order."""
    units, group, group_bytes = [], [], 0

    def close_group():
        nonlocal group, group_bytes
        if group:
            units.append({"kind": "text", "files": group})
        group, group_bytes = [], 0

    for path in paths:
        kind, size = _kind(path), os.path.getsize(path)
        if kind == "text":
            group.append((path, 0, None))
            group_bytes += size
            if group_bytes >= chunk_bytes:
                close_group()
            continue
        close_group()
        if kind != "jsonl":
            units.append({"kind": kind, "files": [(path, 0, None)]})
            continue
        start = 0
        with open(path, "rb") as f:
            while start < size:
                f.seek(min(start + chunk_bytes, size))
                if f.tell() < size:
                    f.readline()  # to the end of the line the boundary falls in
                end = f.tell()
                units.append({"kind": kind, "files": [(path, start, end)]})
                start = end
        if size == 0:
            units.append({"kind": kind, "files": [(path, 0, 0)]})
    close_group()
    return units


def _decode(raw: bytes, where, invalid: dict) -> str:
    """bytes -> str; invalid UTF-8 replaced, counted, and its first place remembered."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        invalid["count"] += 1
        if invalid["first"] is None:
            invalid["first"] = str(where(e.start))
        return raw.decode("utf-8", errors="replace")


def _record_text(line: bytes, where: str, field: str, invalid: dict) -> str:
    text = _decode(line, lambda _: where, invalid)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise StoreError(f"{where} is not a JSON record ({e.msg})") from None
    if not isinstance(record, dict) or field not in record:
        raise StoreError(f"{where} has no field {field!r} (--jsonl_field)")
    return str(record[field])


def _lines_before(path: str, offset: int) -> int:
    """How many line breaks precede a byte offset (read only to name a line in a message)."""
    count, done = 0, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(1 << 22, offset - done))
            if not block:
                break
            count += block.count(b"\n")
            done += len(block)
    return count


class _Place:
    """`path:line` of a unit's n-th line, computed only when a message needs it."""

    def __init__(self, path: str, start: int, number: int):
        self.path, self.start, self.number = path, start, number

    def __str__(self) -> str:
        before = _lines_before(self.path, self.start) if self.start else 0
        return f"{self.path}:{before + self.number}"


def _jsonl_lines(unit, opener) -> Iterator[tuple[bytes, _Place]]:
    (path, start, end) = unit["files"][0]
    with opener(path) as f:
        if start:
            f.seek(start)
        position, number = start, 1
        for line in f:
            if end is not None and position >= end:
                break
            position += len(line)
            if line.strip():
                yield line, _Place(path, start, number)
            number += 1


def _text_place(path: str, raw: bytes, at: int) -> str:
    line = raw.count(b"\n", 0, at) + 1
    return f"{path}:{line}"


def _documents(unit, field: str, invalid: dict) -> Iterator[str]:
    """The unit's documents, in order."""
    kind = unit["kind"]
    if kind == "text":
        for path, _, _ in unit["files"]:
            with open(path, "rb") as f:
                raw = f.read()
            yield _decode(raw, lambda at, p=path, r=raw: _text_place(p, r, at), invalid)
        return
    if kind in ("jsonl", "jsonl.gz", "jsonl.zst"):
        openers = {"jsonl": lambda p: open(p, "rb"), "jsonl.gz": gzip.open,
                   "jsonl.zst": _open_zstd}  # fmt: skip
        for line, place in _jsonl_lines(unit, openers[kind]):
            yield _record_text(line, place, field, invalid)
        return
    yield from _table_documents(unit["files"][0][0], kind, field)


def _open_zstd(path: str):
    try:
        import zstandard
    except ImportError as e:
        raise StoreError(f"{path}: reading .zst needs `pip install zstandard`") from e
    reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    return io.BufferedReader(reader)


def _table_documents(path: str, kind: str, field: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise StoreError(f"{path}: reading {kind} needs `pip install pyarrow`") from e
    if kind == "parquet":
        table = pq.ParquetFile(path)
        if field not in table.schema_arrow.names:
            raise StoreError(f"{path} has no column {field!r} (--jsonl_field)")
        batches = table.iter_batches(columns=[field], batch_size=ENCODE_BATCH)
    else:
        with open(path, "rb") as f:
            reader = pa.ipc.open_stream(f)
            if field not in reader.schema.names:
                raise StoreError(f"{path} has no column {field!r} (--jsonl_field)")
            batches = list(reader)
    for batch in batches:
        for value in batch.column(batch.schema.names.index(field)).to_pylist():
            yield "" if value is None else str(value)


# ---------------------------------------------------------------------------------------------
# Writing one unit's shard
# ---------------------------------------------------------------------------------------------
def _write_shard(task) -> dict:
    """(Worker.) Tokenizes unit i into shard i; returns its ledger entry."""
    index, unit, directory, tokenizer_dir, field, dtype = task
    tokenizer = _worker_tokenizer(tokenizer_dir)
    names = shard_names(index)
    paths = {k: os.path.join(directory, v) for k, v in names.items()}
    invalid = {"count": 0, "first": None}
    digest, count, offsets = hashlib.sha256(), 0, [0]
    eos = np.asarray([tokenizer.eos_token_id], dtype)
    # The same ids without the character offsets (tokenizers >= 0.21): ~1.3x faster.
    encode = getattr(tokenizer._tok, "encode_batch_fast", tokenizer._tok.encode_batch)
    with open(paths["bin"] + ".tmp", "wb") as out:

        def flush(texts):
            nonlocal count
            for encoding in encode(texts, add_special_tokens=False):
                ids = np.concatenate([eos, np.asarray(encoding.ids, dtype)])
                data = ids.tobytes()
                out.write(data)
                digest.update(data)
                count += len(ids)
                offsets.append(count)

        batch, chars = [], 0
        for text in _documents(unit, field, invalid):
            batch.append(text)
            chars += len(text)
            if len(batch) == ENCODE_BATCH or chars >= ENCODE_CHARS:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
    index_bytes = np.asarray(offsets, np.int64).tobytes()
    with open(paths["idx"] + ".tmp", "wb") as f:
        f.write(index_bytes)
    entry = {
        "num_documents": len(offsets) - 1,
        "num_tokens": count,
        "bytes": count * np.dtype(dtype).itemsize,
        "sha256": digest.hexdigest(),
        "index_bytes": len(index_bytes),
        "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
        "invalid_utf8": invalid,
    }
    os.replace(paths["bin"] + ".tmp", paths["bin"])
    os.replace(paths["idx"] + ".tmp", paths["idx"])
    _write_json(paths["ledger"], entry)  # the commit: this unit is done
    return entry


_TOKENIZERS: dict[str, OPTTokenizer] = {}


def _worker_tokenizer(directory: str) -> OPTTokenizer:
    if directory not in _TOKENIZERS:
        _TOKENIZERS[directory] = OPTTokenizer.from_pretrained(directory)
    return _TOKENIZERS[directory]


def _write_json(path: str, value) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def _read_ledger(directory: str, index: int) -> dict | None:
    """A finished unit's entry, if its files are all there with the recorded sizes."""
    names = shard_names(index)
    try:
        with open(os.path.join(directory, names["ledger"])) as f:
            entry = json.load(f)
        sizes = (os.path.getsize(os.path.join(directory, names[k])) for k in ("bin", "idx"))
    except (OSError, json.JSONDecodeError):
        return None
    return entry if tuple(sizes) == (entry["bytes"], entry["index_bytes"]) else None


def _source_entry(path: str) -> dict:
    return {"path": path, "bytes": os.path.getsize(path), "sha256": sha256_of(path)}


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------
def prepare_store(source: str, tokenizer_dir: str, out: str, *, workers: int = 1,
                  text_field: str = "text", chunk_bytes: int = CHUNK_BYTES,
                  log=None) -> dict:  # fmt: skip
    """Builds (or finishes building) the token store of `source` in `out`.

    Returns:
      The manifest (also written to out/manifest.json).

    Raises:
      StoreError: no file matched, a record without the field, a build in `out` with other
        settings, ... (one line, naming the file).
    """
    if not isinstance(workers, int) or workers < 1:
        raise StoreError(f"workers must be a positive integer, got {workers!r}")
    if not isinstance(chunk_bytes, int) or chunk_bytes < 0:
        raise StoreError(f"chunk_bytes must be an integer >= 0, got {chunk_bytes!r}")
    paths = match_sources(source)
    tokenizer = OPTTokenizer.from_pretrained(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    units = plan_units(paths, chunk_bytes)
    plan = {
        "format": FORMAT, "version": VERSION, "sources": paths, "text_field": text_field,
        "tokenizer": tokenizer.fingerprint(), "dtype": dtype.name, "chunk_bytes": chunk_bytes,
        "units": units,
    }  # fmt: skip
    plan = json.loads(json.dumps(plan))  # tuples as lists, as they read back
    os.makedirs(out, exist_ok=True)
    plan_path, manifest_path = os.path.join(out, PLAN), os.path.join(out, MANIFEST)
    if os.path.isfile(plan_path):
        with open(plan_path) as f:
            earlier = json.load(f)
        if earlier != plan:
            changed = sorted(k for k in plan if earlier.get(k) != plan[k])
            raise StoreError(
                f"{out} holds a store built with other settings ({', '.join(changed)} differ); "
                "use another --out or delete it"
            )
        if os.path.isfile(manifest_path):
            with open(manifest_path) as f:
                return json.load(f)
    else:
        _write_json(plan_path, plan)
    tokenizer.save(os.path.join(out, TOKENIZER_DIR))  # what a run trains with, beside the tokens
    entries = {i: e for i in range(len(units)) if (e := _read_ledger(out, i)) is not None}
    todo = [(i, units[i], out, tokenizer_dir, text_field, dtype.name)
            for i in range(len(units)) if i not in entries]  # fmt: skip
    if log and entries:
        log(f"resuming: {len(entries)} of {len(units)} units already written")
    if workers == 1 or len(todo) + len(paths) <= 1:
        results = [_write_shard(t) for t in todo]
        sources = [_source_entry(p) for p in paths]
    else:
        context = multiprocessing.get_context("spawn")  # no forked JAX / tokenizer threads
        with context.Pool(workers, initializer=_quiet_worker) as pool:
            pending = pool.map_async(_write_shard, todo, chunksize=1)
            sources = pool.map(_source_entry, paths)
            results = pending.get()
    entries.update({t[0]: r for t, r in zip(todo, results, strict=True)})
    manifest = _manifest(plan, [entries[i] for i in range(len(units))], sources, tokenizer)
    _write_json(manifest_path, manifest)
    return manifest


def _quiet_worker():
    # Each worker encodes its own batches; the tokenizers' own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _manifest(plan: dict, shards: list[dict], sources: list[dict], tokenizer) -> dict:
    invalid = [s["invalid_utf8"] for s in shards]
    firsts = [i["first"] for i in invalid if i["first"]]
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": plan["dtype"],
        "num_documents": sum(s["num_documents"] for s in shards),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "tokenizer": {
            "fingerprint": plan["tokenizer"],
            "vocab_size": tokenizer.vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
        },  # fmt: skip
        "text_field": plan["text_field"],
        "sources": sources,
        "invalid_utf8": {
            "documents": sum(i["count"] for i in invalid),
            "first": firsts[0] if firsts else None,
        },  # fmt: skip
        "shards": [{k: v for k, v in s.items() if k != "invalid_utf8"} for s in shards],
    }
