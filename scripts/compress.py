"""Compresses an OPT checkpoint with GPTQ, SparseGPT or SmoothQuant (or a baseline), calibrated
layer by layer as the papers do, and writes the result where every other script loads it.

  python scripts/compress.py --model demo_out --method gptq --bits 4 --group_size 128 \
      --calibration demo_out/data/train.npy --nsamples 128 --seq_len 128 --out demo_gptq4
  python scripts/compress.py --model opt-125m --method sparsegpt --sparsity 0.5 \
      --calibration 'c4/*.txt' --out opt-125m-sparse50 --eval wiki.txt
  python scripts/compress.py --model opt-125m --method smoothquant --alpha 0.5 \
      --calibration pile.npy --out opt-125m-w8a8

Methods: gptq (--bits, --group_size, --act_order, --static_groups), sparsegpt (--sparsity or
--prune_n/--prune_m, optionally --bits), smoothquant (--alpha, --activations), and the papers'
baselines: rtn (round to nearest on GPTQ's grid), magnitude (pruning), w8a8 (SmoothQuant's
quantisation without smoothing). --model is an HF directory, one of our exports, or a training
workdir. --calibration is a token store (scripts/prepare_data.py, built with the model's
tokenizer), comma-separated text-file globs (encoded with the model's tokenizer) or a .npy of
token ids (1-D: a stream to draw --nsamples segments of --seq_len tokens from;
[N, T]: the segments). --out gets an HF directory (float results: pruning) or our orbax format
(quantised ones), plus the tokenizer, so generate.py, evaluate.py and serve.py load it.
--eval FILE scores the float and the compressed model on held-out text (or a 1-D .npy).
"""

import json
import os
import resource
import shutil
import sys
import time

from absl import app, flags

flags.DEFINE_string(
    "model", None, "HF directory, our export, or a training workdir.", required=True
)
flags.DEFINE_enum("method", None, ["gptq", "sparsegpt", "smoothquant", "rtn", "magnitude", "w8a8"],
                  "Compression method.", required=True)  # fmt: skip
flags.DEFINE_string("calibration", None, "A token store, text-file globs or a .npy of ids.")
flags.DEFINE_string(
    "out", None, "Output directory (must not hold a checkpoint yet).", required=True
)
flags.DEFINE_integer("nsamples", 128, "Calibration segments.")
flags.DEFINE_integer("seq_len", None, "Tokens per segment (default: min(2048, the context)).")
flags.DEFINE_integer("seed", 0, "Seed of the segments' offsets.")
flags.DEFINE_integer("batch_size", 8, "Calibration segments per forward pass.")
flags.DEFINE_integer("bits", None, "gptq / rtn: 2-8 (default 4); sparsegpt: also quantise.")
flags.DEFINE_integer("group_size", 128, "gptq / rtn: inputs per grid, -1 = one per row.")
flags.DEFINE_bool("act_order", False, "gptq: columns by decreasing Hessian diagonal.")
flags.DEFINE_bool("static_groups", False, "gptq: groups fitted up front (with act_order).")
flags.DEFINE_float("damp", 0.01, "gptq / sparsegpt: dampening, a fraction of mean(diag H).")
flags.DEFINE_integer("block_size", 128, "gptq / sparsegpt: columns per lazy update block.")
flags.DEFINE_float("sparsity", 0.5, "sparsegpt / magnitude: fraction pruned (unstructured).")
flags.DEFINE_integer("prune_n", 0, "sparsegpt / magnitude: N of N:M sparsity.")
flags.DEFINE_integer("prune_m", 0, "sparsegpt / magnitude: M of N:M sparsity.")
flags.DEFINE_float("alpha", 0.5, "smoothquant: migration strength.")
flags.DEFINE_enum("activations", "per_token", ["per_token", "static"], "smoothquant / w8a8.")
flags.DEFINE_string("eval", None, "Held-out text file (or 1-D .npy) to score before and after.")
flags.DEFINE_integer("eval_length", None, "Perplexity window (default: --seq_len).")
flags.DEFINE_integer("eval_tokens", None, "Score at most this many held-out tokens.")
flags.DEFINE_bool("eval_float", True, "With --eval, also score the float model.")
flags.DEFINE_string("json", None, "Write the results (timings, memory, perplexities) here.")

CALIBRATED = ("gptq", "sparsegpt", "smoothquant", "w8a8")


def compress(method, config, params, ids, f, on_layer):
    from opt_jax import compress as c

    common = dict(batch_size=f.batch_size, on_layer=on_layer)
    if method == "gptq":
        return c.gptq(config, params, ids, bits=f.bits or 4, group_size=f.group_size,
                      act_order=f.act_order, static_groups=f.static_groups, damp=f.damp,
                      block_size=f.block_size, **common)  # fmt: skip
    if method == "sparsegpt":
        return c.sparsegpt(config, params, ids, f.sparsity, prune_n=f.prune_n, prune_m=f.prune_m,
                           bits=f.bits, damp=f.damp, block_size=f.block_size, **common)  # fmt: skip
    if method in ("smoothquant", "w8a8"):
        alpha = f.alpha if method == "smoothquant" else None
        return c.smoothquant(config, params, ids, alpha, activations=f.activations, **common)
    if method == "rtn":
        return c.round_to_nearest(config, params, bits=f.bits or 4, group_size=f.group_size)
    return c.magnitude_prune(config, params, f.sparsity, prune_n=f.prune_n, prune_m=f.prune_m)


def perplexity(config, params, tokens, length: int) -> float:
    import opt_jax
    from opt_jax.evaluation import perplexity as score

    model = opt_jax.OPTForCausalLM(config)
    return score(model, params, tokens, max_length=length, stride=length)["perplexity"]


def save(out: str, config, params, tokenizer) -> None:
    """An HF directory for float results, our orbax format for quantised ones; both under a
    temporary name first, so a failure never leaves a half-written checkpoint at --out."""
    import opt_jax
    from opt_jax.checkpoints import orbax_io

    staging = out.rstrip("/") + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    if config.quantization == "none":
        opt_jax.save_pretrained(staging, config, params)
    else:
        orbax_io.save_params(staging, config, params)
    if tokenizer is not None:
        tokenizer.save(staging)
    if os.path.isdir(out):
        os.rmdir(out)  # empty: checked before any work
    os.replace(staging, out)


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        import numpy as np

        import opt_jax
        from opt_jax.checkpoints import orbax_io
        from opt_jax.compress import data
        from opt_jax.data import TokenStore

        if os.path.exists(f.out) and (not os.path.isdir(f.out) or os.listdir(f.out)):
            raise FileExistsError(f"--out {f.out} exists and is not empty; refusing to overwrite")
        if f.method in CALIBRATED and not f.calibration:
            raise ValueError(f"--method {f.method} needs --calibration (text globs or a .npy)")
        model_dir = orbax_io.resolve_checkpoint(f.model)
        config, params = opt_jax.load_pretrained(model_dir, architecture="OPTForCausalLM")
        try:
            tokenizer = opt_jax.OPTTokenizer.from_pretrained(model_dir)
        except FileNotFoundError:
            tokenizer = None
        seq_len = f.seq_len or min(2048, config.max_position_embeddings)
        ids = None
        if f.method in CALIBRATED:
            tokens = data.read_tokens(f.calibration, tokenizer)
            ids = data.sample_segments(tokens, f.nsamples, seq_len, f.seed)
        held_out = None
        if f.eval:
            held_out = data.read_tokens(f.eval, tokenizer)
            if isinstance(held_out, TokenStore):  # a held-out store: its whole stream
                held_out = held_out.tokens(0, held_out.num_tokens)
            held_out = np.asarray(held_out).reshape(-1)
            held_out = held_out[: f.eval_tokens].tolist()
        layer_seconds = []

        def on_layer(index, seconds):
            layer_seconds.append(seconds)
            print(f"[compress] layer {index}: {seconds:.2f} s", file=sys.stderr, flush=True)

        start = time.perf_counter()
        qconfig, qparams = compress(f.method, config, params, ids, f, on_layer)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        result = {
            "model": model_dir, "method": f.method, "out": f.out, "seconds": seconds,
            "layer_seconds": layer_seconds, "peak_rss_bytes": peak,
            "calibration": None if ids is None else list(ids.shape),
            # What calibration holds besides the model: one layer's inputs and outputs.
            "activation_bytes": 0 if ids is None else 2 * ids.size * config.hidden_size * 4,
            "config": {k: getattr(qconfig, k) for k in ("quantization", "quant_bits",
                                                        "quant_group_size", "quant_activations")},
        }  # fmt: skip
        if held_out is not None:
            length = min(f.eval_length or seq_len, config.max_position_embeddings)
            result["eval_length"] = length
            if f.eval_float:
                result["float_perplexity"] = perplexity(config, params, held_out, length)
            result["perplexity"] = perplexity(qconfig, qparams, held_out, length)
        save(f.out, qconfig, qparams, tokenizer)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))
    if f.json:
        with open(f.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    app.run(main)
