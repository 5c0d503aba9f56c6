"""The memory planner against the TPU compiler on a grid of training steps (issue #25).

  python experiments/memory/tpu_grid.py --out experiments/memory/tpu_grid.jsonl

Each point compiles one training step with libtpu's compiler for a 4-chip v5e slice (on this
CPU; nothing runs) and records the compiler's per-chip bytes beside `memory.plan`'s. The grid:
OPT-125m, 1.3b and 6.7b widths (hidden size, heads, FFN, the 50272-token vocabulary) with
--layers decoder layers (fewer than the presets' so that each compile takes a minute, not ten:
the planner's activation count is per layer, and the layer count is varied separately), remat
none / full / save_dots, scanned and unrolled layers, fsdp-only (1x4x1) and fsdp x tensor
(1x2x2) meshes, bfloat16 compute with float32 parameters and AdamW moments, 2048-token
sequences, one sequence per data-parallel way. Points already in --out are skipped, so an
interrupted run resumes.
"""

import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("out", "experiments/memory/tpu_grid.jsonl", "Results, one JSON per line.")
flags.DEFINE_list("sizes", ["125m", "1.3b", "6.7b"], "Preset widths.")
flags.DEFINE_list("remat", ["none", "full", "save_dots"], "Remat policies.")
flags.DEFINE_list("scan", ["true", "false"], "scan_layers values.")
flags.DEFINE_list("meshes", ["1x4x1", "1x2x2"], "DATAxFSDPxTENSOR meshes.")
flags.DEFINE_integer("layers", 4, "Decoder layers of each point.")
flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
flags.DEFINE_integer("per_way", 1, "Sequences per data-parallel way.")
flags.DEFINE_string("topology", "v5e:2x2", "TPU slice.")
flags.DEFINE_list("model", [], "Further model fields, FIELD=VALUE (e.g. dropout=0.0).")
FLAGS = flags.FLAGS


def _key(point: dict) -> str:
    return json.dumps({k: point[k] for k in sorted(point)}, sort_keys=True)


def _experiment(size: str, remat: str, scan: bool, layers: int, fields: dict):
    """configs/opt.py's recipe for `size` (the file loaded by path: configs is not a package)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("opt_recipe", f"{root}/configs/opt.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    experiment = recipe.get_config(size)
    experiment.model.num_hidden_layers = layers
    experiment.model.dtype = "bfloat16"
    experiment.model.remat_policy = remat
    experiment.model.scan_layers = scan
    experiment.model.attention_impl = "einsum"
    for name, value in fields.items():
        experiment.model[name] = _number(value)
    return experiment


def _number(text: str):
    """A --model value: int, float or (otherwise) the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def measure(point: dict) -> dict:
    import jax

    from opt_jax.parallel import sharding
    from opt_jax.planning import memory
    from opt_jax.training import aot
    from opt_jax.training.experiment import model_config

    experiment = _experiment(
        point["size"], point["remat"], point["scan"], point["layers"], point.get("model", {})
    )
    config = model_config(experiment, None)
    mesh_sizes = tuple(point["mesh"])
    mesh = aot.make_mesh(point["topology"], mesh_sizes)
    rules = sharding.rules_from_config(experiment.sharding_rules)
    batch = point["per_way"] * mesh_sizes[0] * mesh_sizes[1]
    began = time.perf_counter()
    (step,), state = aot.train_programs(experiment, config, mesh, rules, batch, point["seq_len"])
    shape = dict(zip(("data", "fsdp", "tensor"), mesh_sizes, strict=True))
    plan = memory.plan(config, shape, batch, point["seq_len"])
    return {
        "point": point,
        "compiler": step.bytes_per_chip,
        "refused": step.error,
        "state_bytes": sharding.per_device_bytes(state, jax.tree.map(lambda x: x.sharding, state)),
        "plan": {
            k: plan[k]
            for k in ("params", "optimizer", "activations", "logits", "update", "temporaries")
        },  # fmt: skip
        "seconds": time.perf_counter() - began,
    }


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    done = set()
    if os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            done = {_key(json.loads(line)["point"]) for line in f if line.strip()}
    for size in FLAGS.sizes:
        for mesh in FLAGS.meshes:
            for scan in FLAGS.scan:
                for remat in FLAGS.remat:
                    point = {"size": size, "mesh": [int(x) for x in mesh.split("x")],
                             "scan": scan == "true", "remat": remat, "layers": FLAGS.layers,
                             "seq_len": FLAGS.seq_len, "per_way": FLAGS.per_way,
                             "topology": FLAGS.topology}  # fmt: skip
                    if FLAGS.model:
                        point["model"] = dict(item.split("=", 1) for item in FLAGS.model)
                    if _key(point) in done:
                        continue
                    r = measure(point)
                    c, p = r["compiler"], r["plan"]
                    ratio = p["temporaries"] / max(c["temporaries"], 1)
                    print(f"{size:5s} mesh {mesh} scan {scan:5s} remat {remat:9s}: temporaries "
                          f"compiler {c['temporaries'] / 2**30:6.2f} GiB, planner "
                          f"{p['temporaries'] / 2**30:6.2f} ({ratio:.2f}x); "
                          f"{r['seconds']:.0f} s", flush=True)  # fmt: skip
                    with open(FLAGS.out, "a") as f:
                        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    app.run(main)
