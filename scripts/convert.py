"""Converts between HF OPT directories and opt_jax orbax parameter checkpoints.

  python scripts/convert.py --to orbax --src HF_DIR --dst CKPT_DIR
  python scripts/convert.py --to hf --src CKPT_DIR --dst HF_DIR [--max_shard_gb 5]
  python scripts/convert.py --src_format metaseq --src restored.pt --to hf --dst HF_DIR \
      [--model_config 350m]    # a consolidated metaseq checkpoint (to hf or to orbax)
  python scripts/convert.py --src_format metaseq --src OPT_66B_DIR --to hf --dst HF_DIR \
      --model_config 66b       # a directory (or glob) of reshard-model_part-K.pt parts

Nothing is downloaded: HF_DIR must be a local directory (e.g. from `huggingface-cli download`).
The tokenizer files of --src (tokenizer.json, vocab.json, merges.txt, ...) are copied to --dst,
so `scripts/generate.py --model DST` finds them.
"""

import os
import shutil
import sys
import time

import jax
from absl import app, flags, logging

import opt_jax
from opt_jax.checkpoints import orbax_io as checkpoint

flags.DEFINE_enum("to", None, ["orbax", "hf"], "Direction of the conversion.", required=True)
flags.DEFINE_string("src", None, "Source directory.", required=True)
flags.DEFINE_string(
    "dst", None, "Destination directory (must not hold a checkpoint).", required=True
)
flags.DEFINE_enum(
    "param_dtype", None, ["float32", "bfloat16", "float16"], "Cast weights to this dtype."
)
flags.DEFINE_enum(
    "src_format", "hf", ["hf", "metaseq"],
    "With metaseq, --src is a consolidated metaseq .pt file (or a directory holding one), or a "
    "directory / glob of model-parallel parts reshard-model_part-K.pt.",
)  # fmt: skip
flags.DEFINE_string(
    "model_config", None,
    "With --src_format metaseq: a preset (125m ... 175b) or an HF config.json / its directory "
    "(default: the preset whose shapes the checkpoint has).",
)  # fmt: skip
flags.DEFINE_float("max_shard_gb", None, "With --to hf: shard safetensors files above this size.")
flags.DEFINE_enum(
    "quantize",
    None,
    ["int8", "int4", "llm_int8"],
    "With --to orbax: quantise the weights as they are read (a quantised orbax checkpoint).",
)


# What OPTTokenizer.from_pretrained and transformers' AutoTokenizer read.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "added_tokens.json",
)


def _check_paths(to: str, src: str, dst: str, src_format: str = "hf") -> None:
    """Everything about --src and --dst that needs no weights: checked before the (possibly
    long) load, so a wrong command fails at once."""
    if src_format == "metaseq":
        if not os.path.exists(src):
            raise FileNotFoundError(f"--src {src} does not exist")
        _check_dst(to, dst)
        return
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src {src} is not a directory")
    is_orbax = os.path.isdir(os.path.join(src, checkpoint.PARAMS_DIR))
    if to == "orbax":
        if is_orbax:
            raise ValueError(
                f"--src {src} is already an orbax checkpoint (it has {checkpoint.PARAMS_DIR}/); "
                "did you mean --to hf?"
            )
    else:
        if not is_orbax:
            message = f"--src {src} has no orbax {checkpoint.PARAMS_DIR}/ checkpoint"
            if os.path.isfile(os.path.join(src, "config.json")):
                message += "; it looks like an HF directory: did you mean --to orbax?"
            raise FileNotFoundError(message)
    _check_dst(to, dst)


def _check_dst(to: str, dst: str) -> None:
    if to == "orbax":
        target = os.path.join(dst, checkpoint.PARAMS_DIR)
        if os.path.exists(target):
            raise FileExistsError(
                f"--dst {dst} already holds an orbax checkpoint ({target} exists); choose a new "
                "directory"
            )
    elif os.path.exists(os.path.join(dst, "config.json")):
        raise FileExistsError(
            f"--dst {dst} already holds a checkpoint (config.json); choose an empty directory"
        )


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copies the tokenizer files that exist in src to dst (never overwriting); returns them."""
    copied = []
    for name in TOKENIZER_FILES:
        source, target = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isfile(source) and not os.path.exists(target):
            shutil.copyfile(source, target)
            copied.append(name)
    return copied


def _convert(args) -> None:
    if args.max_shard_gb is not None and args.max_shard_gb <= 0:
        raise ValueError(f"--max_shard_gb must be > 0, got {args.max_shard_gb}")
    if args.model_config and args.src_format != "metaseq":
        raise ValueError("--model_config applies to --src_format metaseq only")
    if args.quantize and (args.to != "orbax" or args.src_format == "metaseq"):
        raise ValueError("--quantize applies to --to orbax from an HF directory only")
    _check_paths(args.to, args.src, args.dst, args.src_format)
    start = time.time()
    print(f"[convert] reading {args.src}", flush=True)
    if args.src_format == "metaseq":
        config, params = opt_jax.load_metaseq(
            args.src, args.model_config, param_dtype=args.param_dtype
        )
    elif args.to == "orbax":
        config, params = opt_jax.load_pretrained(
            args.src, param_dtype=args.param_dtype, quantize=args.quantize
        )
    else:
        overrides = {"param_dtype": args.param_dtype} if args.param_dtype else {}
        config, params = checkpoint.load_params(args.src, **overrides)
    count = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"[convert] {config.architecture}: {count:,} parameters ({time.time() - start:.1f}s)",
        flush=True,
    )
    if args.to == "orbax":
        checkpoint.save_params(args.dst, config, params)
    else:
        shard = int(args.max_shard_gb * 2**30) if args.max_shard_gb else None
        opt_jax.save_pretrained(args.dst, config, params, max_shard_bytes=shard)
    copied = copy_tokenizer(args.src, args.dst) if os.path.isdir(args.src) else []
    if copied:
        print(f"[convert] copied tokenizer files: {', '.join(copied)}", flush=True)
    else:
        print(
            f"[convert] {args.src} has no tokenizer files; give generate.py --tokenizer DIR",
            flush=True,
        )
    print(f"[convert] wrote {args.dst} ({time.time() - start:.1f}s)", flush=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        _convert(flags.FLAGS)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # CheckpointError: ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
