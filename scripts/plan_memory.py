"""Per-device memory of training and decoding any OPT preset on a mesh, and whether it fits.

  python scripts/plan_memory.py --preset 13b --mesh 1,64,8 --batch 256 --seq_len 2048 \
      --dtype bfloat16 --remat full
  python scripts/plan_memory.py --table      # every preset on common meshes (the README table)
  python scripts/plan_memory.py --preset 6.7b --batch 8 --seq_len 512 --lora_rank 8
  python scripts/plan_memory.py --search --preset 6.7b --batch 1024 --topology v5p:4x4x4 \
      --compile 2

--search tries every data x fsdp x tensor mesh of a slice's chips (--topology, or --chips
devices of --accelerator) and every remat policy (with
the fewest gradient-accumulation micro-batches that fit) and lists the layouts that fit, the
smallest per-device memory first; --compile K then compiles the first K for --topology with the
TPU compiler (scripts/aot_compile.py, minutes each at full size) and prints its bytes beside.

--mesh is data,fsdp,tensor. Parameters, optimizer state and gradients are exact (from the real
shardings, in the TPU's tiles); temporaries are predicted for the TPU compiler (--compiler tpu,
fitted on experiments/memory's grid; --scan_layers=False for unrolled layers) or XLA:CPU
(--compiler xla_cpu: Korthikanti et al. 2022's counts, checked by tests against
compiled.memory_analysis()).
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # planning only: no accelerator is used

from absl import app, flags  # noqa: E402

import opt_jax  # noqa: E402
from opt_jax.planning import memory  # noqa: E402

flags.DEFINE_string("preset", "125m", "Model size.")
flags.DEFINE_string("mesh", "1,1,1", "data,fsdp,tensor sizes.")
flags.DEFINE_integer("batch", 8, "Global batch (sequences).")
flags.DEFINE_integer("seq_len", 2048, "Sequence length.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16", "float16"], "Compute dtype.")
flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_enum("remat", "full", ["none", "full", "save_dots", "save_dots_no_batch"], "Remat.")
flags.DEFINE_integer("grad_accum", 1, "Gradient-accumulation micro-batches per step.")
flags.DEFINE_integer(
    "lora_rank", 0, "LoRA rank on q_proj and v_proj (0: full training); only adapters train."
)
flags.DEFINE_bool("scan_layers", True, "Layers scanned (how large models train) or unrolled.")
flags.DEFINE_enum(
    "compiler", "tpu", list(memory.COMPILERS), "Whose temporaries to predict (memory.plan)."
)
flags.DEFINE_bool("search", False, "List the meshes and remat policies that fit --chips devices.")
flags.DEFINE_integer("chips", 8, "--search: devices to lay the model out on.")
flags.DEFINE_enum("accelerator", "tpu-v5e", list(memory.ACCELERATORS), "--search: device type.")
flags.DEFINE_integer("top", 20, "--search: layouts to print.")
flags.DEFINE_integer("compile", 0, "--search: compile the first K layouts for --topology.")
flags.DEFINE_string(
    "topology",
    None,
    "--search: the TPU slice (e.g. v5p:4x4x4) to lay out on, in place of --chips and "
    "--accelerator; --compile compiles for it.",
)
flags.DEFINE_bool("table", False, "Print the table of every preset on common meshes.")
flags.DEFINE_bool(
    "inference_table",
    False,
    "Print which presets fit one 80 GB GPU / one TPU v5e host for "
    "decoding (batch 1, 2048 tokens) in bfloat16, int8 and int4.",
)

# (preset, data, fsdp, tensor, global batch): meshes people use for each size.
TABLE = [
    ("125m", 8, 1, 1, 256), ("350m", 8, 1, 1, 256), ("1.3b", 1, 8, 1, 512),
    ("2.7b", 1, 8, 1, 512), ("6.7b", 1, 64, 1, 1024), ("13b", 1, 64, 4, 1024),
    ("30b", 1, 128, 8, 2048), ("66b", 1, 128, 8, 1024), ("175b", 1, 128, 8, 1024),
]  # fmt: skip


def _gib(n):
    return f"{n / memory.GiB:.1f}"


def _row(preset, data, fsdp, tensor, batch, seq_len, dtype, param_dtype, remat, accum=1, lora=0):
    f = flags.FLAGS
    cfg = opt_jax.preset(preset, dtype=dtype, param_dtype=param_dtype, remat_policy=remat,
                         lora_rank=lora, scan_layers=f.scan_layers)  # fmt: skip
    mesh = {"data": data, "fsdp": fsdp, "tensor": tensor}
    p = memory.plan(cfg, mesh, batch, seq_len, grad_accum_steps=accum, compiler=f.compiler)
    fit = [name for name in memory.ACCELERATORS if memory.fits(p["train_total"], name)]
    return p, (
        f"| {preset} | {data}x{fsdp}x{tensor} | {batch}x{seq_len} | {_gib(p['params'])} | "
        f"{_gib(p['optimizer'])} | {_gib(p['activations'] + p['logits'])} | "
        f"{_gib(p['update'])} | {_gib(p['train_total'])} | "
        f"{', '.join(fit) or 'none'} |"
    )


HEADER = (
    "| preset | mesh (data x fsdp x tensor) | batch x seq | params | optimizer "
    "| activations + logits | update | train total (GiB/device) | fits (90%) |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def _parse_mesh(text: str) -> tuple[int, int, int]:
    """--mesh "data,fsdp,tensor" -> three positive sizes."""
    parts = [part.strip() for part in text.split(",")]
    try:
        sizes = tuple(int(part) for part in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(
            f"--mesh expects three positive sizes data,fsdp,tensor (e.g. 1,64,8), got {text!r}"
        )
    return sizes


def _check(f, data: int, fsdp: int) -> None:
    """Flag values the planner would otherwise turn into a crash or a meaningless plan."""
    for name in ("batch", "seq_len", "grad_accum"):
        if getattr(f, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(f, name)}")
    config = opt_jax.preset(f.preset)  # an unknown preset is a ValueError naming the choices
    if f.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"--seq_len {f.seq_len} exceeds the {f.preset} model's max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    if f.batch % (data * fsdp):
        raise ValueError(f"--batch {f.batch} is not divisible by data x fsdp = {data * fsdp}")
    if (f.batch // (data * fsdp)) % f.grad_accum:
        raise ValueError(
            f"--batch {f.batch} over data x fsdp = {data * fsdp} is {f.batch // (data * fsdp)} "
            f"per shard, which --grad_accum {f.grad_accum} does not divide"
        )


INFERENCE_FORMATS = ("none", "int8", "int4")


def inference_table() -> str:
    """Decoding memory (parameters + KV cache + temporaries, batch 1 x 2048 tokens, bfloat16
    compute) of every preset in each weight format, on one 80 GB GPU and on a TPU v5e host (8
    chips of 16 GB, tensor-parallel over all 8 where the heads divide, else 4)."""
    lines = [
        "| preset | weights | GiB on one device | fits one 80 GB GPU | GiB per chip, v5e host "
        "(tensor 8) | fits a v5e host |",
        "|---|---|---|---|---|---|",
    ]
    for preset in opt_jax.PRESETS:
        for method in INFERENCE_FORMATS:
            cfg = opt_jax.preset(preset, dtype="bfloat16", param_dtype="bfloat16",
                                 quantization=method)  # fmt: skip
            # the GPU's bytes unpadded (xla_cpu); the v5e's in the TPU's tiles
            one = memory.plan(cfg, {}, 1, 2048, compiler="xla_cpu")["inference_total"]
            tensor = 8 if cfg.num_attention_heads % 8 == 0 else 4
            chip = memory.plan(cfg, {"tensor": tensor}, 1, 2048)["inference_total"]
            name = {"none": "bfloat16", "int8": "int8", "int4": "int4 (g128)"}[method]
            lines.append(
                f"| {preset} | {name} | {_gib(one)} | "
                f"{'yes' if memory.fits(one, 'h100-80gb') else 'no'} | {_gib(chip)} | "
                f"{'yes' if memory.fits(chip, 'tpu-v5e') else 'no'} |"
            )
    return "\n".join(lines)


SEARCH_HEADER = (
    "| mesh (data x fsdp x tensor) | remat | micro-batches | params + optimizer | "
    "activations + logits | update | train total (GiB/device) |\n|---|---|---|---|---|---|---|"
)


def _compile(f, layout: dict) -> str:
    """scripts/aot_compile.py on one layout: the compiler's total per chip (GiB) or its error."""
    import json
    import subprocess
    import tempfile

    mesh = layout["mesh"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        done = subprocess.run(
            [sys.executable, os.path.join(os.path.dirname(__file__), "aot_compile.py"),
             f"--config={os.path.join(os.path.dirname(__file__), '..', 'configs', 'opt.py')}"
             f":{f.preset}", "--topology", f.topology,
             "--mesh", f"{mesh['data']},{mesh['fsdp']},{mesh['tensor']}",
             "--batch", str(f.batch), "--seq_len", str(f.seq_len), "--json", out,
             f"--config.model.dtype={f.dtype}", f"--config.model.param_dtype={f.param_dtype}",
             f"--config.model.remat_policy={layout['remat_policy']}",
             f"--config.model.scan_layers={f.scan_layers}",
             f"--config.optim.grad_accum_steps={layout['grad_accum_steps']}"],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode:
            return (done.stderr.strip().splitlines() or ["failed"])[-1]
        with open(out) as fh:
            r = json.load(fh)
    return f"compiler: {_gib(r['bytes_per_chip']['total'])} GiB, fits {r['fits']}"


def _slice(f) -> tuple[int, str]:
    """(chips, accelerator) to search: --topology's, or --chips and --accelerator."""
    if not f.topology:
        if f.compile:
            raise ValueError("--compile needs --topology (the TPU slice to compile for)")
        return f.chips, f.accelerator
    from opt_jax.training import aot

    generation, chips = aot.topology_chips(f.topology)
    accelerator = f"tpu-{generation}"
    if accelerator not in memory.ACCELERATORS:
        raise ValueError(f"--topology {f.topology}: no HBM size known for {generation} chips "
                         f"(known: {sorted(memory.ACCELERATORS)})")  # fmt: skip
    for name, value in (("chips", chips), ("accelerator", accelerator)):
        if f[name].present and f[name].value != value:
            raise ValueError(
                f"--{name} {f[name].value} disagrees with --topology {f.topology} ({value})"
            )
    return chips, accelerator


def search(f) -> None:
    _check(f, 1, 1)
    chips, accelerator = _slice(f)
    if chips < 1:
        raise ValueError(f"--chips must be >= 1, got {chips}")
    cfg = opt_jax.preset(f.preset, dtype=f.dtype, param_dtype=f.param_dtype,
                         lora_rank=f.lora_rank, scan_layers=f.scan_layers)  # fmt: skip
    gib = memory.ACCELERATORS[accelerator]
    found = memory.search(cfg, chips, f.batch, f.seq_len, gib * memory.GiB, compiler=f.compiler)
    print(f"{f.preset}, batch {f.batch} x {f.seq_len}, on {chips} x {accelerator} "
          f"({gib} GiB, 90% usable): {len(found)} layouts fit")  # fmt: skip
    if not found:
        return
    print(SEARCH_HEADER)
    for i, r in enumerate(found[: f.top]):
        m = r["mesh"]
        line = (
            f"| {m['data']}x{m['fsdp']}x{m['tensor']} | {r['remat_policy']} | "
            f"{r['grad_accum_steps']} | {_gib(r['params'] + r['optimizer'])} | "
            f"{_gib(r['activations'] + r['logits'])} | {_gib(r['update'])} | "
            f"{_gib(r['train_total'])} |"
        )
        if i < f.compile:
            line += f" {_compile(f, r)}"
        print(line, flush=True)


def main(argv):
    del argv
    f = flags.FLAGS
    if f.search:
        try:
            search(f)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        return
    if f.inference_table:
        print(inference_table())
        print(
            "\nParameters (embeddings bfloat16, Linear kernels in the format) + KV cache "
            "(bfloat16, batch 1 x 2048) + decoding's temporaries (a layer's kernels in flight, "
            "the prompt's attention scores), 90% of device memory usable; "
            "`python scripts/plan_memory.py --inference_table`"
        )
        return
    if f.table:
        print(HEADER)
        for preset, data, fsdp, tensor, batch in TABLE:
            print(_row(preset, data, fsdp, tensor, batch, 2048, "bfloat16", "float32", "full")[1])
        print(
            "\nbf16 compute, float32 params and AdamW moments, remat=full, seq 2048; "
            "`python scripts/plan_memory.py --table`"
        )
        return
    try:
        data, fsdp, tensor = _parse_mesh(f.mesh)
        _check(f, data, fsdp)
        p, row = _row(
            f.preset,
            data,
            fsdp,
            tensor,
            f.batch,
            f.seq_len,
            f.dtype,
            f.param_dtype,
            f.remat,
            f.grad_accum,
            f.lora_rank,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for key, value in p.items():
        print(f"{key:>16}: {_gib(value):>8} GiB")
    print(HEADER)
    print(row)


if __name__ == "__main__":
    app.run(main)
