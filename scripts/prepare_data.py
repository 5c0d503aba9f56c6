"""Tokenizes a corpus once into a token store: memory-mapped shards that training reads by step.

  python scripts/prepare_data.py --source 'corpus/*.jsonl.zst,books/*.txt' \
      --tokenizer opt-125m --out stores/corpus --workers 8
  python scripts/train.py --config configs/tiny.py --config.data.source=stores/corpus

--source: comma-separated globs of .jsonl / .jsonl.gz / .jsonl.zst (one document per line, its
--jsonl_field), Parquet or Hugging Face `datasets` .arrow files (that column), or text files
(one document each). --tokenizer: a tokenizer directory (an HF OPT checkpoint's). The store is
the same, byte for byte, for any --workers; run the same command again to finish a build that
was killed. DIR/manifest.json appears only when the store is complete. See opt_jax/data/.
"""

import json
import sys
import time

from absl import app, flags

flags.DEFINE_string("source", None, "Comma-separated globs of corpus files.", required=True)
flags.DEFINE_string("tokenizer", None, "Tokenizer directory.", required=True)
flags.DEFINE_string("out", None, "The store's directory.", required=True)
flags.DEFINE_integer("workers", 1, "Tokenizing processes.")
flags.DEFINE_string("jsonl_field", "text", "The text field of JSON records / table columns.")
flags.DEFINE_integer("chunk_mb", 64, "Text per work unit (and shard), in MiB.")


def main(argv):
    del argv
    f = flags.FLAGS
    from opt_jax.data import StoreError, prepare_store

    start = time.perf_counter()
    log = lambda message: print(f"[prepare_data] {message}", file=sys.stderr)  # noqa: E731
    try:
        manifest = prepare_store(
            f.source, f.tokenizer, f.out, workers=f.workers, text_field=f.jsonl_field,
            chunk_bytes=f.chunk_mb << 20, log=log,
        )  # fmt: skip
    except (StoreError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    seconds = time.perf_counter() - start
    invalid = manifest["invalid_utf8"]
    if invalid["documents"]:
        print(f"[prepare_data] {invalid['documents']} document(s) held invalid UTF-8 (replaced "
              f"with U+FFFD), the first at {invalid['first']}", file=sys.stderr)  # fmt: skip
    summary = {k: manifest[k] for k in ("num_documents", "num_tokens", "dtype")}
    summary.update(shards=len(manifest["shards"]), seconds=round(seconds, 2), out=f.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
