"""Compiles the training step or the decoding programs of an experiment for a TPU slice, on any
machine (libtpu's compiler, `pip install "jax[tpu]"`), and says what each chip needs.

  python scripts/aot_compile.py --config configs/opt.py:1.3b --topology v5e:4x4 --mesh 1,16,1 \
      --config.model.dtype=bfloat16 --config.model.remat_policy=full --json out.json
  python scripts/aot_compile.py --config configs/opt.py:6.7b --topology v5e:2x4 --mesh 1,1,8 \
      --workload decode --batch 8 --seq_len 2048 --json decode.json

--workload train compiles the training step exactly as scripts/train.py jits it (sharded
state donated, LoRA / quantised bases as the config asks); decode compiles generate's prefill
(a --seq_len/2 prompt) and one decode step against a --seq_len cache; serve compiles the
serving engine's programs (opt_jax/serving/engine.py) with --batch slots of --seq_len tokens:
one request's prefill, its copy into a slot, and the engine's decode step for every slot.
Printed and written as JSON: per-chip bytes from the compiler (arguments, outputs, temporaries,
aliased, total) against the chip's HBM, `fits` (95% of HBM), the memory planner's estimate of
the same fields, model FLOPs per step with the MFU formula a measured step time gives, compile
seconds, and the collectives of the compiled HLO (count and bytes per step; scanned layers
counted per layer). --save DIR writes each compiled program (NAME.exe, serialized, and
NAME.json: the chips and the jax / jaxlib / libtpu versions a loading process must have); on
the slice, `opt_jax.training.aot.load_executable("DIR/train_step.exe")` returns it ready to
call. Compiled, not run. Exit 0 when the program compiled, fits or not; 2 with one line otherwise.
"""

import json
import os
import sys

# The slice is abstract: nothing runs, so no accelerator is needed (or wanted) here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's start-up probe
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no machine-wide lock file

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:2x4 or v5p:2x2x2.", required=True)
flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes (product = chips).", required=True)
flags.DEFINE_integer("batch", None, "Global batch (default: the config's batch_size).")
flags.DEFINE_integer("seq_len", None, "Sequence length (default: the config's seq_len).")
flags.DEFINE_enum("workload", "train", ["train", "decode", "serve"], "What to compile.")
flags.DEFINE_string("json", None, "Write the report here.")
flags.DEFINE_string("hlo", None, "Write the compiled HLO of the largest program here.")
flags.DEFINE_string(
    "save", None, "Write each compiled program here (NAME.exe + NAME.json), to load on the slice."
)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _model_config(experiment):
    from opt_jax.training.experiment import model_config

    vocab = experiment.data.get("vocab_size") if "data" in experiment else None
    config = model_config(experiment, vocab)
    lora = experiment.get("lora")
    method = lora.get("quantize_base", "") if lora is not None else ""
    if method:  # QLoRA: a quantised frozen base under the adapters
        config = config.replace(quantization=method)
    return config


def _mesh_sizes(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"--mesh must be three positive sizes data,fsdp,tensor, got {text!r}")
    return sizes


def _plan(config, mesh, batch, seq_len, workload, accum, scalars=0):
    """The planner's bytes per chip in the compiler's fields; `scalars`: the training state's
    scalar leaves (step, skip flag, the optimizer's counters), each one 512-byte tile."""
    from opt_jax.planning import memory

    shape = dict(zip(("data", "fsdp", "tensor"), mesh, strict=True))
    p = memory.plan(config, shape, batch, seq_len, grad_accum_steps=accum)
    if workload == "train":
        state = p["params"] + p["optimizer"] + scalars * memory.tpu_array_bytes((), 4)
        # ids and mask (int32, rows over data x fsdp) and the rng key, as the TPU lays them out
        rows = batch // (mesh[0] * mesh[1])
        inputs = 2 * memory.tpu_array_bytes((rows, seq_len), 4) + memory.tpu_array_bytes((2,), 4)
        fields = {"arguments": state + inputs, "outputs": state, "aliased": state,
                  "temporaries": p["temporaries"]}  # fmt: skip
    else:  # params + cache in, the cache out (donated); the engine's step: no temporaries planned
        # The engine's slots also carry each slot's next-token logits and token counts [B, V].
        rows = batch // (mesh[0] * mesh[1])
        slots = (
            0 if workload == "decode" else 2 * memory.tpu_array_bytes((rows, config.vocab_size), 4)
        )
        carried = p["kv_cache"] + slots
        fields = {"arguments": p["params"] + carried, "outputs": carried, "aliased": carried,
                  "temporaries": p["decode_temporaries"] if workload == "decode" else None,
                  "host_arguments": p["host_params"]}  # fmt: skip
    known = [v for k, v in fields.items() if k not in ("aliased", "host_arguments") and v]
    fields["total"] = sum(known) - fields["aliased"]
    return fields


def report(experiment, topology, mesh, batch, seq_len, workload, hlo=None, save=None) -> dict:
    """Compiles and returns the JSON report (see the module docstring); `hlo`: a path for the
    compiled HLO text of the largest program; `save`: a directory for the serialized
    executables (aot.save_executable; load them on the slice with aot.load_executable)."""
    import jax

    from opt_jax.planning.roofline import device_peaks, model_flops_per_token
    from opt_jax.training import aot

    config = _model_config(experiment)
    accum = experiment.optim.grad_accum_steps if workload == "train" else 1
    aot.check_heads(config, mesh[2])
    data_ways = mesh[0] * mesh[1]
    if batch % data_ways:
        raise ValueError(f"batch {batch} is not divisible by data x fsdp = {data_ways}")
    device_mesh = aot.make_mesh(topology, mesh)
    from opt_jax.parallel import sharding

    rules = sharding.rules_from_config(experiment.sharding_rules)
    scalars = 0
    if workload == "train":
        programs, state = aot.train_programs(experiment, config, device_mesh, rules, batch, seq_len)
        scalars = sum(leaf.ndim == 0 for leaf in jax.tree.leaves(state))
        flops = 3 * model_flops_per_token(config, seq_len) * batch * seq_len
    else:
        from opt_jax.serving.aot import serving_programs

        build = aot.decode_programs if workload == "decode" else serving_programs
        programs, _ = build(config, device_mesh, rules, batch, seq_len)
        flops = model_flops_per_token(config, seq_len) * batch  # one decode step
    main = max(programs, key=lambda c: c.bytes_per_chip["total"])
    if hlo and main.executable is not None:
        with open(hlo, "w") as f:
            f.write(main.executable.as_text())
    hbm = aot.chip_hbm_bytes(topology)
    chips = len(device_mesh.devices.flat)
    kind = device_mesh.devices.flat[0].device_kind
    peak = device_peaks(kind, "bfloat16")
    saved = []
    if save:
        about = {"topology": topology, "mesh": list(mesh), "batch": batch, "seq_len": seq_len,
                 "workload": workload, "config": experiment.to_json()}  # fmt: skip
        saved = [aot.save_executable(save, c.name, c.executable, about)
                 for c in programs if c.executable is not None]  # fmt: skip
    return {
        "workload": workload,
        "topology": topology,
        "device_kind": kind,
        "chips": chips,
        "mesh": dict(zip(("data", "fsdp", "tensor"), mesh, strict=True)),
        "batch": batch,
        "seq_len": seq_len,
        "model": {
            "hidden_size": config.hidden_size,
            "layers": config.num_hidden_layers,
            "dtype": config.dtype,
            "param_dtype": config.param_dtype,
            "remat_policy": config.remat_policy,
            "scan_layers": config.scan_layers,
            "attention_impl": config.attention_impl,
            "lora_rank": config.lora_rank,
            "quantization": config.quantization,
        },  # fmt: skip
        "fits": all(c.bytes_per_chip["total"] <= aot.HEADROOM * hbm for c in programs),
        "hbm_bytes_per_chip": hbm,
        "bytes_per_chip": main.bytes_per_chip,
        "program": main.name,
        "programs": {
            c.name: {
                "bytes_per_chip": c.bytes_per_chip,
                "collectives": c.collectives,
                "compile_seconds": c.compile_seconds,
            }
            for c in programs
        },  # fmt: skip
        "grad_accum_steps": accum,
        "plan": _plan(config, mesh, batch, seq_len, workload, accum, scalars),
        "model_flops_per_step": flops,
        "mfu_formula": (
            f"MFU = {flops:.4g} / (step_seconds x {chips} chips x "
            f"{peak['flops'] if peak else 'peak FLOP/s per chip'})"
        ),
        "compile_seconds": sum(c.compile_seconds for c in programs),
        # Set when the compiler refused a program for want of HBM: its message (the bytes above
        # are then the arguments and the temporaries it asked for).
        "compiler_refused": {c.name: c.error for c in programs if c.error} or None,
        "collectives": main.collectives,
        "saved": saved,
    }


def _print(r: dict) -> None:
    gib = 1024**3
    b = r["bytes_per_chip"]
    print(
        f"{r['workload']} on {r['topology']} ({r['chips']} chips, mesh "
        f"{'x'.join(str(v) for v in r['mesh'].values())}): {r['program']} compiled in "
        f"{r['compile_seconds']:.0f} s"
    )
    names = ("arguments", "outputs", "aliased", "temporaries", "total")
    for name in names + (("host_arguments",) if b.get("host_arguments") else ()):
        planned = r["plan"].get(name)
        planned = "-" if planned is None else f"{planned / gib:.2f}"
        print(f"  {name:12s} {b[name] / gib:8.2f} GiB   (planner {planned})")
    print(
        f"  HBM {r['hbm_bytes_per_chip'] / gib:.0f} GiB per chip: "
        f"{'fits' if r['fits'] else 'DOES NOT FIT'}"
    )
    for program, message in (r["compiler_refused"] or {}).items():
        print(f"  {program}: the compiler refused it: {message}")
    used = {k: v for k, v in r["collectives"].items() if v["count"]}
    for name, v in used.items():
        print(f"  {name:18s} {v['count']:5d} x, {v['bytes'] / gib:.3f} GiB per step")
    print(f"  {r['mfu_formula']}")
    for path in r["saved"]:
        print(f"  saved {path} (load on the slice: opt_jax.training.aot.load_executable)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        experiment = FLAGS.config
        mesh = _mesh_sizes(FLAGS.mesh)
        batch = FLAGS.batch or experiment.batch_size
        seq_len = FLAGS.seq_len or experiment.seq_len
        r = report(experiment, FLAGS.topology, mesh, batch, seq_len, FLAGS.workload, FLAGS.hlo,
                   FLAGS.save)  # fmt: skip
    except (ValueError, ImportError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # the compiler's own failures (XlaRuntimeError, ...): one line too
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {first}", file=sys.stderr)
        sys.exit(1)
    _print(r)
    if FLAGS.json:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        with open(FLAGS.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    app.run(main)
