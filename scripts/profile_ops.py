"""Where a workload's time goes, operation by operation (the profiles in experiments/perf).

  python scripts/profile_ops.py --workload train                 # 125m, 4 x 256 training step
  python scripts/profile_ops.py --workload prefill --batch 8 --length 128
  python scripts/profile_ops.py --workload decode --batch 8      # 32-token prompt, 64 new
  python scripts/profile_ops.py --smoke                          # tiny shape (CI)

Runs the workload (random weights) under jax.profiler after a warm-up call, and adds up the
time of every compiled operation (XLA:CPU runs one "thunk" per HLO instruction) over --reps
calls. Operations are grouped by instruction kind, output shape and the model code they come
from (layer indices folded, so the 12 layers' fc1 products are one row; "transpose(jvp" marks
the backward pass). Kinds: `ynn_fusion` is a product in XLA's matmul library (YNNPACK) with
the elementwise work XLA fused into it, `dot` / `dot_general` a product in Eigen, the other
fusions elementwise or layout work (`copy`/`transpose`: data moved, not computed).

Read the sums with care: XLA runs independent operations concurrently on the CPU's threads, so
they can exceed the wall time, and an operation that waits for a thread counts its wait. The
CPU model is printed first: compare profiles of the same CPU only.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

# The optimised HLO of every program is dumped (its text names each instruction's shape and
# source), so this must be set before JAX starts its backend.
_DUMP = tempfile.mkdtemp(prefix="opt_jax_hlo_")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={_DUMP}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import opt_jax  # noqa: E402
from opt_jax.planning import roofline  # noqa: E402
from opt_jax.training import train  # noqa: E402
from opt_jax.training.experiment import base_config  # noqa: E402

flags.DEFINE_enum("workload", "train", ["train", "prefill", "decode"], "What to profile.")
flags.DEFINE_string("preset", "125m", "Model shape (random weights).")
flags.DEFINE_integer("batch", None, "Rows (default: train 4, prefill 1, decode 1).")
flags.DEFINE_integer("length", None, "Tokens per row (train 256, prefill 512, decode prompt 32).")
flags.DEFINE_integer("new_tokens", 64, "decode: tokens generated per call.")
flags.DEFINE_integer("reps", 3, "Profiled calls (after one warm-up call).")
flags.DEFINE_integer("top", 30, "Rows of the table.")
flags.DEFINE_enum(
    "quantize", None, ["int8", "int4", "llm_int8"], "prefill/decode with these weights."
)
flags.DEFINE_bool("smoke", False, "A tiny model and short inputs: checks the script runs.")
FLAGS = flags.FLAGS

DEFAULTS = {"train": (4, 256), "prefill": (1, 512), "decode": (1, 32)}


def workload(config, kind: str, batch: int, length: int, new_tokens: int, quantize=None):
    """A no-argument callable that runs the workload once and waits for it."""
    params = opt_jax.init_params(config, 0)
    if quantize:
        if kind == "train":
            raise ValueError("--quantize profiles prefill or decode, not training")
        config, params = opt_jax.quantize(config, params, quantize)
    model = opt_jax.OPTForCausalLM(config)
    ids = np.random.default_rng(0).integers(4, config.vocab_size, (batch, length), np.int32)
    if kind == "prefill":
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
        return lambda: forward(params, ids).block_until_ready()
    if kind == "decode":
        return lambda: opt_jax.generate(  # returns host arrays: finished when it returns
            model, params, ids, max_new_tokens=new_tokens, eos_token_id=[]
        )
    optim = base_config().optim
    tx = train.make_optimizer(optim, 1000)
    state = [train.fresh_state(params, tx)]
    step = jax.jit(
        lambda s, b, r: train.train_step(s, b, r, model=model, tx=tx, optim=optim),
        donate_argnums=(0,),
    )
    batch_ = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones(ids.shape, jnp.int32)}

    def run():
        state[0], metrics = step(state[0], batch_, jax.random.key(0))
        jax.block_until_ready(metrics)

    return run


_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(")


def instructions(dump_dir: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(module name, instruction name) -> (output shape, source op_name) from the HLO dumps."""
    out = {}
    for path in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")):
        module = re.sub(r"^module_\d+\.", "", os.path.basename(path)).split(".cpu_after")[0]
        module = module.replace(".", "_")
        for line in open(path):
            m = _INSTRUCTION.match(line)
            if m:
                source = re.search(r'op_name="([^"]*)"', line)
                shape = re.sub(r"\{[^}]*\}", "", m.group(2))
                out[(module, m.group(1))] = (shape, source.group(1) if source else "")
    return out


def _source(op_name: str) -> str:
    """A short, layer-independent name for where an operation comes from."""
    text = re.sub(r"^jit\([^)]*\)/", "", op_name)
    text = re.sub(r"layers_\d+", "layers_*", text)
    backward = "backward " if "transpose(jvp" in text else ""
    text = re.sub(r"transpose\(jvp\([^)]*\)\)/", "", text)
    return backward + "/".join(text.split("/")[-3:])


def op_table(trace_dir: str, dump_dir: str, reps: int) -> tuple[list[dict], float]:
    """Rows (time per call, share, count per call, kind, shape, source), largest first."""
    [path] = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    known = instructions(dump_dir)
    totals, counts = collections.Counter(), collections.Counter()
    for event in json.load(gzip.open(path))["traceEvents"]:
        args = event.get("args", {})
        if event.get("ph") != "X" or "hlo_op" not in args:
            continue
        module = args.get("hlo_module", "").replace(".", "_")
        shape, source = known.get((module, args["hlo_op"]), ("?", ""))
        key = (re.sub(r"\.\d+$", "", args["hlo_op"]), shape, _source(source))
        totals[key] += event["dur"] / 1e3 / reps  # microseconds -> ms per call
        counts[key] += 1
    total = sum(totals.values())
    rows = [
        {"ms": ms, "share": ms / total, "count": counts[key] / reps, "kind": key[0],
         "shape": key[1], "source": key[2]}
        for key, ms in totals.most_common()
    ]  # fmt: skip
    return rows, total


def main(argv):
    del argv
    try:
        profile()
    finally:  # the HLO dumps take tens of MB for the 125m shape
        shutil.rmtree(_DUMP, ignore_errors=True)


def profile():
    if FLAGS.smoke:
        config = opt_jax.OPTConfig(
            vocab_size=512, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
        )  # fmt: skip
        batch, length, new_tokens = 2, 16, 4
    else:
        config = opt_jax.preset(FLAGS.preset)
        batch, length = DEFAULTS[FLAGS.workload]
        new_tokens = FLAGS.new_tokens
    batch, length = FLAGS.batch or batch, FLAGS.length or length
    run = workload(config, FLAGS.workload, batch, length, new_tokens, FLAGS.quantize)
    run()  # compile outside the profile
    trace_dir = tempfile.mkdtemp(prefix="opt_jax_trace_")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(FLAGS.reps):
        run()
    wall = (time.perf_counter() - start) / FLAGS.reps * 1e3
    jax.profiler.stop_trace()
    try:
        rows, total = op_table(trace_dir, _DUMP, FLAGS.reps)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    what = f"{FLAGS.workload} {batch} x {length}" + (
        f", {new_tokens} new tokens" if FLAGS.workload == "decode" else ""
    )
    shape = "smoke" if FLAGS.smoke else FLAGS.preset
    print(f"{what}, {shape} shape, {FLAGS.quantize or 'float32'} weights")
    print(f"CPU: {roofline.describe_cpu()}")
    print(f"wall {wall:.1f} ms per call; operations add up to {total:.1f} ms (they overlap)\n")
    print("| ms per call | share | per call | kind | shape | from |")
    print("|---|---|---|---|---|---|")
    for r in rows[: FLAGS.top]:
        print(
            f"| {r['ms']:.2f} | {100 * r['share']:.1f}% | {r['count']:g} | {r['kind']} | "
            f"{r['shape']} | {r['source']} |"
        )
    if not rows:
        sys.exit("no operations in the profile (did jax.profiler record this backend?)")


if __name__ == "__main__":
    app.run(main)
