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

import functools
import importlib.util
import json
import math
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags, logging  # noqa: E402


def _define_flags() -> None:
    """The command line (defined when run as a script, so that tests can import the module
    beside other absl programs that define --out)."""
    flags.DEFINE_string("out", "experiments/memory/tpu_grid.jsonl", "Results, one JSON per line.")
    flags.DEFINE_list("sizes", ["125m", "1.3b", "6.7b"], "Preset widths.")
    flags.DEFINE_list("remat", ["none", "full", "save_dots"], "Remat policies.")
    flags.DEFINE_list("scan", ["true", "false"], "scan_layers values.")
    flags.DEFINE_list("meshes", ["1x4x1", "1x2x2"], "DATAxFSDPxTENSOR meshes.")
    flags.DEFINE_integer("layers", 4, "Decoder layers of each point.")
    flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
    flags.DEFINE_integer("per_way", 1, "Sequences per data-parallel way.")
    flags.DEFINE_string("topology", "v5e:2x2", "TPU slice.")
    flags.DEFINE_bool(
        "fit", False, "Fit the planner's TPU constants to --out's points (held out: --hold_out)."
    )
    flags.DEFINE_list("hold_out", [], "--fit: widths not fitted on, only checked.")
    flags.DEFINE_bool(
        "report", False, "Print --out's points against the current planner, as a table."
    )
    flags.DEFINE_list("model", [], "Further model fields, FIELD=VALUE (e.g. dropout=0.0).")
    flags.DEFINE_bool(
        "heap",
        False,
        "Compile --out's points that lack one again with an XLA dump and add what the compiler's "
        "heap holds (heap.py: allocation, live peak, fragmentation, the largest live values).",
    )


FLAGS = flags.FLAGS


def _key(point: dict) -> str:
    return json.dumps({k: point[k] for k in sorted(point)}, sort_keys=True)


@functools.cache
def _recipe():
    """configs/opt.py (loaded by path: configs is not a package)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("opt_recipe", f"{root}/configs/opt.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def _experiment(point: dict):
    """The OPT paper's recipe for the point's width, with its layers, remat and fields."""
    experiment = _recipe().get_config(point["size"])
    experiment.model.num_hidden_layers = point["layers"]
    experiment.model.dtype = "bfloat16"
    experiment.model.remat_policy = point["remat"]
    experiment.model.scan_layers = point["scan"]
    experiment.model.attention_impl = "einsum"
    for name, value in point.get("model", {}).items():
        experiment.model[name] = _number(value)
    return experiment


def _setup(point: dict):
    """(experiment, its OPTConfig, mesh {"data", "fsdp", "tensor"}, global batch)."""
    from opt_jax.training.experiment import model_config

    experiment = _experiment(point)
    mesh = dict(zip(("data", "fsdp", "tensor"), point["mesh"], strict=True))
    batch = point["per_way"] * mesh["data"] * mesh["fsdp"]
    return experiment, model_config(experiment, None), mesh, batch


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

    experiment, config, shape, batch = _setup(point)
    mesh = aot.make_mesh(point["topology"], tuple(point["mesh"]))
    rules = sharding.rules_from_config(experiment.sharding_rules)
    began = time.perf_counter()
    (step,), state = aot.train_programs(experiment, config, mesh, rules, batch, point["seq_len"])
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
        "stacked": None
        if step.executable is None
        else stacked_bytes(step.executable.as_text(), point["layers"], point["seq_len"]),
    }


_ARRAY = re.compile(r"\b(f32|bf16|f16|pred|s8|u8|s32|u32)\[([0-9,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1, "s32": 4, "u32": 4}


def stacked_bytes(hlo: str, layers: int, seq_len: int) -> dict | None:
    """What a scanned forward pass keeps for the backward pass, read off the compiled HLO: the
    [layers, ...] arrays with a sequence-length axis in the state of the entry computation's
    first while loop (the forward scan), by dtype and rank; None without such a loop."""
    entry = hlo[hlo.index("\nENTRY ") :]
    for line in entry.splitlines():
        if " while(" not in line:
            continue
        state = line.split(" while(")[0]
        found = {}
        for dtype, dims in _ARRAY.findall(state):
            shape = [int(d) for d in dims.split(",") if d]
            if len(shape) < 2 or shape[0] != layers or seq_len not in shape[1:]:
                continue
            name = f"{dtype}[{','.join(map(str, shape[1:]))}]"
            found[name] = found.get(name, 0) + math.prod(shape) * _BYTES[dtype]
        if found:
            return found
    return None


def _replan(point: dict, compiler: str = "tpu") -> dict:
    from opt_jax.planning import memory

    _, config, mesh, batch = _setup(point)
    return memory.plan(config, mesh, batch, point["seq_len"], compiler=compiler)


def report(path: str) -> None:
    """The recorded points against the current planner: a markdown table and the spread."""
    gib = 2**30
    print("| width | mesh | layers | tokens / chip | attention | remat | compiler | planner | "
          "planner / compiler | Korthikanti et al. / compiler |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios = {True: [], False: []}
    within = 0
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            p, compiled = r["point"], r["compiler"]["temporaries"]
            if r.get("refused"):
                continue
            planned = _replan(p)["temporaries"]
            analytic = _replan(p, "xla_cpu")["temporaries"]
            ratios[p["scan"]].append(planned / compiled)
            within += abs(planned / compiled - 1) <= 0.1
            layers = f"{p['layers']} {'scanned' if p['scan'] else 'unrolled'}"
            mesh = "x".join(map(str, p["mesh"]))
            attention = p.get("model", {}).get("attention_impl", "einsum")
            print(f"| {p['size']} | {mesh} | {layers} | {p['per_way']} x {p['seq_len']} | "
                  f"{attention} | {p['remat']} | {compiled / gib:.2f} | {planned / gib:.2f} | "
                  f"{planned / compiled:.2f} | {analytic / compiled:.2f} |")  # fmt: skip
    print(f"within 10%: {within} of {sum(map(len, ratios.values()))} points")
    for scan, values in ratios.items():
        if values:
            print(f"{'scanned' if scan else 'unrolled'}: planner / compiler "
                  f"{min(values):.2f}-{max(values):.2f} over {len(values)} points")  # fmt: skip
    heap_report(path)


def heap_report(path: str) -> None:
    """The points recorded with --heap: the compiler's reported temporaries against its heap
    (heap.py): the allocation, the live peak, the live peak without loop state, and how far the
    reported number is from allocation + (allocation - peak without loop state)."""
    with open(path) as f:
        rows = [r for r in map(json.loads, f) if "heap" in r]
    if not rows:
        return
    gib = 2**30
    print("\n| width | mesh | layers | tokens / chip | attention | remat | reported | allocation | "
          "live peak | without loop state | reported - (2 allocation - that) | planner / "
          "allocation |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    close = 0
    for r in rows:
        p, h, reported = r["point"], r["heap"], r["compiler"]["temporaries"]
        rest = reported - 2 * h["allocation"] + h["live_peak_without_loop_state"]
        close += abs(rest) <= 0.02 * reported
        planned = _replan(p)["temporaries"]
        layers = f"{p['layers']} {'scanned' if p['scan'] else 'unrolled'}"
        attention = p.get("model", {}).get("attention_impl", "einsum")
        print(f"| {p['size']} | {'x'.join(map(str, p['mesh']))} | {layers} | {p['per_way']} x "
              f"{p['seq_len']} | {attention} | {p['remat']} | {reported / gib:.2f} | "
              f"{h['allocation'] / gib:.2f} | {h['live_peak'] / gib:.2f} | "
              f"{h['live_peak_without_loop_state'] / gib:.2f} | {rest / gib:+.2f} | "
              f"{planned / h['allocation']:.2f} |")  # fmt: skip
    print(
        f"reported = 2 x allocation - live peak without loop state, within 2%: {close} of "
        f"{len(rows)} points"
    )


def _features(point: dict) -> tuple[float, tuple[float, ...]]:
    """memory.tpu_terms of a point: (bytes the layers keep, the six terms the fit weighs)."""
    from opt_jax.planning import memory

    _, config, mesh, _ = _setup(point)
    tokens = point["per_way"] * point["seq_len"]
    gradients = _replan(point)["gradients"]  # the sharded float32 gradients
    return memory.tpu_terms(config, tokens, point["seq_len"], mesh["tensor"], gradients)


def _minimax(x, kept, compiled):
    """Non-negative constants c minimising the worst |(x c + kept) / compiled - 1| (a linear
    program: the 10% the TPU issue asks for is a worst case, not an average)."""
    import numpy as np
    from scipy.optimize import linprog

    a, k = x / compiled[:, None], kept / compiled
    n, m = a.shape
    ones = np.ones((n, 1))
    res = linprog(  # variables: c (m of them), then the worst error e; minimise e
        np.r_[np.zeros(m), 1.0],
        A_ub=np.vstack([np.hstack([a, -ones]), np.hstack([-a, -ones])]),
        b_ub=np.r_[1 - k, k - 1],
        bounds=[(0, None)] * (m + 1),
    )
    return res.x[:m]


def fit(path: str) -> None:
    """The planner's constants for unrolled layers, per remat: non-negative multiples of [the
    loss's logits, linear working set, score working set, a layer's gathered float32 weights,
    the gathered float32 token table, the sharded gradients] that, added to what the layers
    keep, minimise the worst relative error against the compiler's temporaries; prints them for
    memory.py and each point's planned / compiled ratio, in the fit and left out of it
    (held-out widths marked). Scanned layers are not fitted: memory._scanned_step models the
    compiler's heap."""
    import numpy as np

    with open(path) as f:  # a step the compiler refused reports only what it asked for
        rows = [r for r in map(json.loads, f) if not r.get("refused")]
    table = {}
    for scan in (False,):  # scanned layers: memory._scanned_step, a model of the heap
        for remat in FLAGS.remat:
            group = [r for r in rows if r["point"]["scan"] == scan and r["point"]["remat"] == remat]
            if not group:
                continue
            kept, features = zip(*(_features(r["point"]) for r in group), strict=True)
            compiled = np.array([r["compiler"]["temporaries"] for r in group], float)
            fitted = np.array([r["point"]["size"] not in FLAGS.hold_out for r in group])
            x, kept = np.array(features), np.array(kept)
            coef = _minimax(x[fitted], kept[fitted], compiled[fitted])
            ratio = (x @ coef + kept) / compiled
            # Leave-one-out: each fitted point predicted by a fit on the others.
            out = []
            for i in np.flatnonzero(fitted):
                others = fitted.copy()
                others[i] = False
                c = _minimax(x[others], kept[others], compiled[others])
                out.append((x[i] @ c + kept[i]) / compiled[i])
            out = iter(out)
            table[(scan, remat)] = tuple(round(float(v), 3) for v in coef)
            name = f"{'scanned' if scan else 'unrolled'} {remat}"
            print(f"{name}: ({', '.join(f'{v:.3f}' for v in coef)})")
            for r, q, used in zip(group, ratio, fitted, strict=True):
                p = r["point"]
                print(f"    {p['size']:5s} {'x'.join(map(str, p['mesh']))} layers {p['layers']} "
                      f"{p.get('model', {})} {q:.3f} "
                      f"{f'(left out: {next(out):.2f})' if used else '(held out)'}")  # fmt: skip
    print("_TPU_REST = {")
    for key, value in table.items():
        print(f"    {key}: {value},")
    print("}")


def add_heaps(path: str, dump: str) -> None:
    """--heap: each point of `path` without a "heap" entry is compiled again, dumped into `dump`
    (XLA_FLAGS, set before jax starts), and the heap read off the dump (heap.py) is added to its
    line; the file is rewritten after each point, so an interrupted run resumes."""
    import shutil

    import heap

    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        if "heap" in r or r.get("refused"):
            continue
        shutil.rmtree(dump)  # the previous point's modules
        again = measure(r["point"])
        t = again["compiler"]["temporaries"]
        if t != r["compiler"]["temporaries"]:
            logging.warning("%s: %d bytes of temporaries, %d recorded", r["point"], t,
                            r["compiler"]["temporaries"])  # fmt: skip
        r["heap"] = h = heap.read(dump)
        print(f"{r['point']}: temporaries {t / 2**30:.2f} GiB = allocation "
              f"{h['allocation'] / 2**30:.2f} + {(t - h['allocation']) / 2**30:.2f} "
              f"(fragmentation {h['fragmentation'] / 2**30:.2f}); live peak "
              f"{h['live_peak'] / 2**30:.2f}", flush=True)  # fmt: skip
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(path + ".tmp", path)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.fit:
        fit(FLAGS.out)
        return
    if FLAGS.report:
        report(FLAGS.out)
        return
    if FLAGS.heap:
        import tempfile

        dump = tempfile.mkdtemp(prefix="tpu_grid_dump_")  # read by jax when its backend starts
        os.environ["XLA_FLAGS"] = " ".join(
            (os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={dump}", "--xla_dump_hlo_as_text")
        )
        add_heaps(FLAGS.out, dump)
        return
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
    _define_flags()
    app.run(main)
