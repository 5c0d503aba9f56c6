"""Pretraining data at scale: token stores (a corpus tokenized once into memory-mapped shards,
built in parallel and resumably) and weighted mixtures of them served by step.

  opt_jax.data.prepare_store("corpus/*.jsonl", "opt-125m", "store", workers=8)
  store = opt_jax.data.TokenStore("store")         # len(store), store.num_tokens, .document(i)
  mix = opt_jax.data.Mixture([("store_a", 0.7), ("store_b", 0.3)], seq_len=2048,
                             global_batch=256, seed=0)
  mix.batch(step, process_index, process_count)    # {"input_ids": int32 [B / count, T], ...}

(Until 0.2 `opt_jax.data` named the training run's in-memory data module, now
opt_jax.training.data; its names still resolve from here, with a DeprecationWarning.)
"""

from opt_jax._deprecation import moved
from opt_jax.data.mixture import Mixture, parse_mixture
from opt_jax.data.prepare import prepare_store
from opt_jax.data.store import StoreError, TokenStore

__all__ = ["Mixture", "StoreError", "TokenStore", "parse_mixture", "prepare_store"]

__getattr__ = moved(
    __name__,
    {
        name: "opt_jax.training.data"
        for name in (
            "ArrayDataset",
            "PackedDataset",
            "load_documents",
            "prepare",
            "split_documents",
            "tokenize",
            "tokenizer_source",
        )  # fmt: skip
    },
)
