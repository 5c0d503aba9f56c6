"""Converts between HF OPT directories and opt_jax orbax parameter checkpoints.

  python scripts/convert.py --to orbax --src HF_DIR --dst CKPT_DIR
  python scripts/convert.py --to hf --src CKPT_DIR --dst HF_DIR [--max_shard_gb 5]

Nothing is downloaded: HF_DIR must be a local directory (e.g. from `huggingface-cli download`).
"""

import os
import time

from absl import app, flags, logging

import opt_jax
from opt_jax import checkpoint

flags.DEFINE_enum("to", None, ["orbax", "hf"], "Direction of the conversion.", required=True)
flags.DEFINE_string("src", None, "Source directory.", required=True)
flags.DEFINE_string(
    "dst", None, "Destination directory (must not hold a checkpoint).", required=True
)
flags.DEFINE_enum(
    "param_dtype", None, ["float32", "bfloat16", "float16"], "Cast weights to this dtype."
)
flags.DEFINE_float("max_shard_gb", None, "With --to hf: shard safetensors files above this size.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    args = flags.FLAGS
    start = time.time()
    print(f"[convert] reading {args.src}", flush=True)
    if args.to == "orbax":
        config, params = opt_jax.load_pretrained(args.src, param_dtype=args.param_dtype)
    else:
        overrides = {"param_dtype": args.param_dtype} if args.param_dtype else {}
        config, params = checkpoint.load_params(args.src, **overrides)
    count = sum(x.size for x in __import__("jax").tree.leaves(params))
    print(
        f"[convert] {config.architecture}: {count:,} parameters ({time.time() - start:.1f}s)",
        flush=True,
    )
    if args.to == "orbax":
        checkpoint.save_params(args.dst, config, params)
    else:
        if os.path.exists(os.path.join(args.dst, "config.json")):
            raise SystemExit(f"{args.dst} already holds a checkpoint; choose an empty directory")
        shard = int(args.max_shard_gb * 2**30) if args.max_shard_gb else None
        opt_jax.save_pretrained(args.dst, config, params, max_shard_bytes=shard)
    print(f"[convert] wrote {args.dst} ({time.time() - start:.1f}s)", flush=True)


if __name__ == "__main__":
    app.run(main)
