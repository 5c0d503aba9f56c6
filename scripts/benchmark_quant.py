"""Quantised formats against float32, measured in one run: parameter bytes, held-out
perplexity and decode speed at batch 1 and 8.

  python scripts/random_checkpoint.py --preset 125m --out /tmp/opt-125m-random
  python scripts/benchmark_quant.py --model /tmp/opt-125m-random --trained demo_out

--model: an HF directory (the 125m shape with random weights above): bytes (the sum of the
parameter arrays' nbytes, as the quantisation issue defines them), perplexity of --text and
the decode speed of `generate` (prompt 32, --tokens new tokens, greedy, batch 1 and 8, median of
--reps interleaved rounds).
--trained: a training workdir (the demo's): perplexity of its held-out tokens
(WORKDIR/data/eval.npy, the first --eval_tokens) under each format. Prints a markdown table
and the CPU; --output writes JSON.
"""

import json
import os
import statistics
import sysconfig
import time

from absl import app, flags

flags.DEFINE_string("model", None, "HF directory (e.g. a random 125m).", required=True)
flags.DEFINE_string("trained", None, "A training workdir whose export and held-out data to use.")
flags.DEFINE_string("text", None, "Text file for --model's perplexity (default: textwrap.py).")
flags.DEFINE_integer("tokens", 64, "New tokens per timed decode.")
flags.DEFINE_integer("reps", 3, "Timed decodes per format (median).")
flags.DEFINE_integer("eval_tokens", 32768, "Held-out tokens of --trained to score.")
flags.DEFINE_string("output", None, "Write the results as JSON here.")

FORMATS = ("float32", "int8", "llm_int8", "int4")


def _formats(config, params):
    import opt_jax

    for name in FORMATS:
        yield (
            name,
            *((config, params) if name == "float32" else opt_jax.quantize(config, params, name)),
        )


def _perplexity(config, params, tokens, max_length=512):
    import opt_jax
    from opt_jax.evaluation import perplexity

    model = opt_jax.OPTForCausalLM(config)
    length = min(max_length, config.max_position_embeddings)
    return perplexity(model, params, tokens, max_length=length, stride=length // 2)["perplexity"]


def _decode_speeds(models, tokens: int, reps: int, batch: int) -> dict[str, float]:
    """Tokens/s of greedy decoding (prompt 32, `tokens` new) per format at one batch size:
    the median of `reps` rounds, each round timing every format once (interleaved, so a slow
    moment of the machine does not fall on one format only)."""
    import numpy as np

    import opt_jax

    prompt = np.tile(np.arange(3, 35, dtype=np.int32), (batch, 1))
    runs = {
        name: lambda c=c, p=p: (
            opt_jax.generate(
                opt_jax.OPTForCausalLM(c), p, prompt, max_new_tokens=tokens, eos_token_id=[]
            ).sequences
        )
        for name, (c, p) in models.items()
    }
    for run in runs.values():
        run()  # compile
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: batch * tokens / statistics.median(t) for name, t in times.items()}


def main(argv):
    del argv
    import jax
    import numpy as np

    import opt_jax
    from opt_jax.planning import roofline

    f = flags.FLAGS
    config, params = opt_jax.load_pretrained(f.model)
    tokenizer = opt_jax.OPTTokenizer.from_pretrained(f.model)
    text_path = f.text or os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")
    with open(text_path, encoding="utf-8") as fh:
        text_tokens = tokenizer.encode(fh.read())
    trained = None
    if f.trained:
        trained = opt_jax.load_pretrained(os.path.join(f.trained, "export"))
        held_out = np.load(os.path.join(f.trained, "data", "eval.npy"))[: f.eval_tokens]
    rows, models = [], {}
    for name, qconfig, qparams in _formats(config, params):
        models[name] = (qconfig, qparams)
        row = {
            "format": name,
            "param_bytes": int(sum(x.nbytes for x in jax.tree.leaves(qparams))),
            "perplexity": _perplexity(qconfig, qparams, text_tokens),
        }
        if trained is not None:
            tconfig, tparams = trained
            if name != "float32":
                tconfig, tparams = opt_jax.quantize(tconfig, tparams, name)
            row["trained_perplexity"] = _perplexity(tconfig, tparams, held_out.tolist())
        rows.append(row)
        print(f"[quant] {row}", flush=True)
    for batch in (1, 8):
        speeds = _decode_speeds(models, f.tokens, f.reps, batch)
        for row in rows:
            row[f"decode_tokens_per_s_batch{batch}"] = speeds[row["format"]]
        print(f"[quant] decode batch {batch}: {speeds}", flush=True)
    base = rows[0]
    cpu = roofline.describe_cpu()
    print(f"CPU: {cpu}")
    print("| format | parameter MB | vs float32 | perplexity (random 125m, "
          f"{os.path.basename(text_path)}) | change | demo model held-out perplexity | change "
          "| decode tokens/s, batch 1 | vs float32 | batch 8 | vs float32 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        trained_cells = "| - | -"
        if "trained_perplexity" in r:
            change = r["trained_perplexity"] / base["trained_perplexity"] - 1
            trained_cells = f"| {r['trained_perplexity']:.3f} | {change:+.2%}"
        speed_cells = "".join(
            f" {r[key]:.1f} | {r[key] / base[key]:.2f}x |"
            for key in ("decode_tokens_per_s_batch1", "decode_tokens_per_s_batch8")
        )
        print(
            f"| {r['format']} | {r['param_bytes'] / 1e6:.1f} | "
            f"{r['param_bytes'] / base['param_bytes']:.3f}x | {r['perplexity']:.1f} | "
            f"{r['perplexity'] / base['perplexity'] - 1:+.2%} {trained_cells} |" + speed_cells
        )
    if f.output:
        with open(f.output, "w") as out:
            json.dump({"cpu": cpu, "rows": rows}, out, indent=2)


if __name__ == "__main__":
    app.run(main)
