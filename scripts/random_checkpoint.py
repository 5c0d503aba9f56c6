"""Writes a small random OPT and a tokenizer as a Hugging Face directory, without downloads.

  python scripts/random_checkpoint.py --out random_opt
  python scripts/random_checkpoint.py --out random_125m --preset 125m   # a public size's shape

Builds a small OPT (4 layers, 256 wide; or the shape of --preset), trains a byte-level BPE
tokenizer on the standard library's sources, saves both as an HF directory, loads them back,
checks the reload is exact, and prints the parameter count and the next-token logits of a code
prompt. Handy for trying scripts/convert.py and scripts/generate.py (and transformers) on a
machine with no weights.
"""

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

import opt_jax

flags.DEFINE_string("out", "random_opt", "Where the HF directory is written.")
flags.DEFINE_integer("seed", 0, "Parameter init seed.")
flags.DEFINE_string("preset", "", "A public size whose shape to use (125m, 350m, ...).")


def main(argv):
    del argv
    out = flags.FLAGS.out
    start = time.time()
    stdlib = Path(json.__file__).parent.parent
    texts = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:200]]
    tokenizer = opt_jax.train_tokenizer(texts, vocab_size=4096)
    print(
        f"[random_checkpoint] trained a {tokenizer.vocab_size}-id tokenizer "
        f"on {len(texts)} stdlib files"
    )

    # Embedding rows rounded up past the tokenizer, as OPT pads 50265 ids to 50272 rows.
    if flags.FLAGS.preset:
        config = opt_jax.preset(flags.FLAGS.preset)  # its 50272 rows cover the 4096 ids
    else:
        config = opt_jax.OPTConfig(
            vocab_size=4096 + 8,
            hidden_size=256,
            num_hidden_layers=4,
            ffn_dim=1024,
            num_attention_heads=4,
            max_position_embeddings=512,
        )
    params = opt_jax.init_params(config, flags.FLAGS.seed)
    opt_jax.save_pretrained(out, config, params)
    tokenizer.save(out)
    print(f"[random_checkpoint] saved a random OPT as an HF directory: {out}")

    loaded_config, loaded = opt_jax.load_pretrained(out)
    same = all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), params, loaded)))
    assert loaded_config == config and same, "reload is not exact"
    count = sum(x.size for x in jax.tree.leaves(loaded))
    print(f"[random_checkpoint] reloaded {count:,} parameters bit for bit")

    prompt = "def fibonacci(n):"
    ids = opt_jax.validate_token_ids([tokenizer.encode(prompt)], config.vocab_size)
    logits = opt_jax.OPTForCausalLM(loaded_config).apply({"params": loaded}, ids).logits
    top = np.argsort(-np.asarray(logits[0, -1]))[:5]
    print(f"[random_checkpoint] prompt {prompt!r} -> ids {ids[0].tolist()}")
    print(
        f"[random_checkpoint] logits {tuple(logits.shape)}, top next tokens (untrained): "
        + ", ".join(repr(tokenizer.decode([int(t)])) for t in top)
    )
    print(f"[random_checkpoint] done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    app.run(main)
