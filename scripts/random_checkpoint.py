"""Writes a small random OPT and a tokenizer as a Hugging Face directory, without downloads.

  python scripts/random_checkpoint.py --out random_opt
  python scripts/random_checkpoint.py --out random_125m --preset 125m   # a public size's shape
  python scripts/random_checkpoint.py --out opt-6.7b-random --preset 6.7b --dtype float16

Builds a small OPT (4 layers, 256 wide; or the shape of --preset), trains a byte-level BPE
tokenizer on the standard library's sources, saves both as an HF directory, loads them back,
checks the reload is exact, and prints the parameter count and the next-token logits of a code
prompt. Handy for trying scripts/convert.py and scripts/generate.py (and transformers) on a
machine with no weights.

--dtype float16 / bfloat16 stores the weights in that dtype. Models above --stream_above
parameters (default 1B) are written tensor by tensor into 2 GB safetensors shards straight from
their shapes (normal(0, init_std) weights, LayerNorms 1, biases 0), so a 6.7b checkpoint (13 GB
in float16) is made with a few GB of memory; they are not reloaded for the bitwise check.
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
flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"], "Stored weight dtype.")
flags.DEFINE_float("stream_above", 1e9, "Write models with more parameters tensor by tensor.")
SHARD_BYTES = 2 * 1024**3


def write_streaming(out: str, config, seed: int) -> int:
    """Writes random weights of `config` as sharded safetensors, one tensor in memory at a time
    (plus the shard being filled). Returns the parameter count."""
    import math

    import ml_dtypes
    from flax import traverse_util
    from safetensors.numpy import save_file

    from opt_jax.checkpoints.hf import SAFE_INDEX, hf_name, hf_shape

    dtype = {"float32": np.float32, "float16": np.float16,
             "bfloat16": ml_dtypes.bfloat16}[config.param_dtype]  # fmt: skip
    specs = traverse_util.flatten_dict(opt_jax.abstract_params(config))
    plan, shard, size = [], [], 0
    for path, spec in specs.items():
        nbytes = math.prod(spec.shape) * np.dtype(dtype).itemsize
        if shard and size + nbytes > SHARD_BYTES:
            plan.append(shard)
            shard, size = [], 0
        shard.append((path, spec))
        size += nbytes
    plan.append(shard)
    rng = np.random.default_rng(seed)
    names, weight_map, total, count = [], {}, 0, 0
    Path(out).mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(plan):
        name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for path, spec in shard:
            shape = hf_shape(path, spec.shape)
            if path[-1] in ("kernel", "embedding"):
                value = rng.standard_normal(shape, np.float32) * config.init_std
            elif path[-1] == "scale":
                value = np.ones(shape, np.float32)
            else:
                value = np.zeros(shape, np.float32)
            tensors[hf_name(path)] = value.astype(dtype)
            weight_map[hf_name(path)] = name
            total += tensors[hf_name(path)].nbytes
            count += value.size
        save_file(tensors, str(Path(out) / name), metadata={"format": "pt"})
        names.append(name)
        print(f"[random_checkpoint] wrote {name} ({len(tensors)} tensors)", flush=True)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(out) / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    config.save_hf(out)
    return count


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
    dtype = flags.FLAGS.dtype
    if flags.FLAGS.preset:  # its 50272 rows cover the 4096 ids
        config = opt_jax.preset(flags.FLAGS.preset, dtype=dtype, param_dtype=dtype)
    else:
        config = opt_jax.OPTConfig(
            vocab_size=4096 + 8,
            hidden_size=256,
            num_hidden_layers=4,
            ffn_dim=1024,
            num_attention_heads=4,
            max_position_embeddings=512,
            dtype=dtype,
            param_dtype=dtype,
        )
    size = sum(x.size for x in jax.tree.leaves(opt_jax.abstract_params(config)))
    if size > flags.FLAGS.stream_above:
        count = write_streaming(out, config, flags.FLAGS.seed)
        tokenizer.save(out)
        print(f"[random_checkpoint] wrote {count:,} random parameters ({dtype}) to {out} in "
              f"{time.time() - start:.1f}s")  # fmt: skip
        return
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
