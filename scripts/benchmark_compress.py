"""The compression table in one command: held-out perplexity of a model compressed by each method
and its baseline, with compression time per layer and peak memory, each method in its own
process (scripts/compress.py), so each peak is its own.

  python scripts/benchmark_compress.py --model demo_out --calibration demo_out/data/train.npy \
      --eval demo_out/data/eval.npy --seq_len 128 --output experiments/compression/demo.json

Rows: float; RTN and GPTQ at 4 and 3 bits, per row and in groups of 128; magnitude pruning and
SparseGPT at 50% and 2:4 (and SparseGPT 50% + 4-bit); naive W8A8 and SmoothQuant (alpha 0.5),
per-token and static activation scales. Calibration: --nsamples segments of --seq_len tokens
of --calibration; evaluation: the first --eval_tokens tokens of --eval in disjoint windows of
--seq_len tokens (as the papers evaluate, at their model's context).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

flags.DEFINE_string(
    "model", None, "HF directory, our export, or a training workdir.", required=True
)
flags.DEFINE_string("calibration", None, "Calibration tokens (.npy) or text globs.", required=True)
flags.DEFINE_string("eval", None, "Held-out tokens (.npy) or a text file.", required=True)
flags.DEFINE_integer("nsamples", 128, "Calibration segments.")
flags.DEFINE_integer("seq_len", 128, "Tokens per calibration segment and evaluation window.")
flags.DEFINE_integer("eval_tokens", 32768, "Held-out tokens scored.")
flags.DEFINE_list("only", [], "Run only the rows with these names (default: all).")
flags.DEFINE_string("output", None, "Write every row as JSON here.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (row name, scripts/compress.py arguments)
ROWS = [
    ("RTN 4-bit", ["--method", "rtn", "--bits", "4", "--group_size", "-1"]),
    ("GPTQ 4-bit", ["--method", "gptq", "--bits", "4", "--group_size", "-1"]),
    ("RTN 4-bit g128", ["--method", "rtn", "--bits", "4", "--group_size", "128"]),
    ("GPTQ 4-bit g128", ["--method", "gptq", "--bits", "4", "--group_size", "128"]),
    ("RTN 3-bit", ["--method", "rtn", "--bits", "3", "--group_size", "-1"]),
    ("GPTQ 3-bit", ["--method", "gptq", "--bits", "3", "--group_size", "-1"]),
    ("RTN 3-bit g128", ["--method", "rtn", "--bits", "3", "--group_size", "128"]),
    ("GPTQ 3-bit g128", ["--method", "gptq", "--bits", "3", "--group_size", "128"]),
    ("magnitude 50%", ["--method", "magnitude", "--sparsity", "0.5"]),
    ("SparseGPT 50%", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    ("magnitude 2:4", ["--method", "magnitude", "--prune_n", "2", "--prune_m", "4"]),
    ("SparseGPT 2:4", ["--method", "sparsegpt", "--prune_n", "2", "--prune_m", "4"]),
    ("SparseGPT 50% + 4-bit", ["--method", "sparsegpt", "--sparsity", "0.5", "--bits", "4"]),
    ("naive W8A8", ["--method", "w8a8"]),
    ("SmoothQuant W8A8", ["--method", "smoothquant", "--alpha", "0.5"]),
    ("naive W8A8 static", ["--method", "w8a8", "--activations", "static"]),
    ("SmoothQuant W8A8 static", ["--method", "smoothquant", "--alpha", "0.5",
                                 "--activations", "static"]),
]  # fmt: skip
# Each compressed row against the row it should beat (the papers' comparisons).
BASELINE_OF = {
    "GPTQ 4-bit": "RTN 4-bit", "GPTQ 4-bit g128": "RTN 4-bit g128", "GPTQ 3-bit": "RTN 3-bit",
    "GPTQ 3-bit g128": "RTN 3-bit g128", "SparseGPT 50%": "magnitude 50%",
    "SparseGPT 2:4": "magnitude 2:4", "SmoothQuant W8A8": "naive W8A8",
    "SmoothQuant W8A8 static": "naive W8A8 static",
}  # fmt: skip


def run_row(name, args, f, scratch, first: bool) -> dict:
    out = os.path.join(scratch, name.replace(" ", "_").replace("%", "pct").replace(":", "-"))
    command = [
        sys.executable, os.path.join(ROOT, "scripts", "compress.py"), "--model", f.model,
        "--calibration", f.calibration, "--nsamples", str(f.nsamples),
        "--seq_len", str(f.seq_len), "--eval", f.eval, "--eval_tokens", str(f.eval_tokens),
        "--out", out, *args, *([] if first else ["--noeval_float"]),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name}: {proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.splitlines()[-1])
    row["name"] = name
    if "out" in row:  # the scratch directory is deleted afterwards: record no path of this machine
        row["out"] = os.path.basename(row["out"])
    print(f"[benchmark_compress] {name}: perplexity {row['perplexity']:.3f} "
          f"in {row['seconds']:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    return row


def table(rows: list[dict], float_ppl: float) -> str:
    by_name = {r["name"]: r for r in rows}
    lines = [
        "| method | held-out perplexity | vs float | gap to float closed vs baseline | "
        "compression s | s per layer (median) | peak RSS MB | calibration activations MB |",
        "|---|---|---|---|---|---|---|---|",
        f"| float32 | {float_ppl:.3f} | | | | | | |",
    ]
    for r in rows:
        closed = ""
        base = by_name.get(BASELINE_OF.get(r["name"], ""))
        if base is not None and base["perplexity"] > float_ppl:
            closed = (
                f"{(base['perplexity'] - r['perplexity']) / (base['perplexity'] - float_ppl):.0%}"
            )
        per_layer = statistics.median(r["layer_seconds"]) if r["layer_seconds"] else 0.0
        activations = r.get("activation_bytes") or 0
        lines.append(
            f"| {r['name']} | {r['perplexity']:.3f} | {r['perplexity'] / float_ppl - 1:+.1%} | "
            f"{closed} | {r['seconds']:.1f} | {per_layer:.2f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} | {activations / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    from opt_jax.planning import roofline

    f = flags.FLAGS
    wanted = [(n, a) for n, a in ROWS if not f.only or n in f.only]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, (name, args) in enumerate(wanted):
            rows.append(run_row(name, args, f, scratch, first=i == 0))
    float_ppl = rows[0]["float_perplexity"]
    cpu = roofline.describe_cpu()
    print(f"CPU: {cpu}")
    print(table(rows, float_ppl))
    if f.output:
        with open(f.output, "w") as out:
            json.dump({"cpu": cpu, "float_perplexity": float_ppl, "rows": rows}, out, indent=2)


if __name__ == "__main__":
    app.run(main)
