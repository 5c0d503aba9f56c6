"""Prints the markdown tables of experiments/tpu/README.md from the JSON files beside it
(scripts/aot_compile.py's reports): python experiments/tpu/tables.py (training per OPT size,
inference on a v5e-8, layers in host memory)"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 2**30
WEIGHTS = {"none": "bfloat16", "int8": "int8", "int4": "int4 (g128)"}
ORDER = ["13b", "30b", "66b", "175b"]


SIZES = ["125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b", "175b"]


def training() -> str:
    """The paper's recipe per size (the *-einsum-2048.json reports beside this file), with the
    current planner's temporaries recomputed from each report's model fields."""
    import opt_jax
    from opt_jax.planning import memory

    lines = [
        "| size | slice | mesh | micro-batches x sequences per chip | arguments | temporaries "
        "| total | planner temporaries (ratio) | fits (95%) | all-gather / all-reduce per step "
        "| compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reports = [(p, json.loads(p.read_text())) for p in HERE.glob("*-einsum-2048.json")]
    for path, r in sorted(reports, key=lambda pr: SIZES.index(pr[0].name.split("-")[0])):
        size, m, b = path.name.split("-")[0], r["mesh"], r["bytes_per_chip"]
        fields = ("dtype", "param_dtype", "remat_policy", "scan_layers", "attention_impl")
        cfg = opt_jax.preset(size, **{k: r["model"][k] for k in fields})
        accum = r["grad_accum_steps"]
        plan = memory.plan(cfg, m, r["batch"], r["seq_len"], grad_accum_steps=accum)
        generation, dims = r["topology"].split(":")
        per_chip = r["batch"] // (m["data"] * m["fsdp"]) // accum
        gather, reduce = (
            r["collectives"][op]["bytes"] / 1e9 for op in ("all-gather", "all-reduce")
        )
        lines.append(
            f"| {size} | {generation}-{r['chips']} ({dims}) | "
            f"{m['data']}x{m['fsdp']}x{m['tensor']} | {accum} x {per_chip} | "
            f"{b['arguments'] / GiB:.2f} GiB | "
            f"{b['temporaries'] / GiB:.2f} GiB | {b['total'] / GiB:.2f} GiB | "
            f"{plan['temporaries'] / GiB:.2f} GiB ({plan['temporaries'] / b['temporaries']:.2f}) | "
            f"{_fits(r)} | {gather:.1f} / {reduce:.1f} GB | {r['compile_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def _rows(folder: str):
    reports = [(p, json.loads(p.read_text())) for p in (HERE / folder).glob("*.json")]

    def key(pr):
        size, method = pr[0].stem.split("-")
        return ORDER.index(size), list(WEIGHTS).index(method)

    return sorted(reports, key=key)


def _fits(r) -> str:
    if r["compiler_refused"]:
        return "no: the compiler refuses it"
    share = r["bytes_per_chip"]["total"] / r["hbm_bytes_per_chip"]
    return "yes" if r["fits"] else f"no: compiles, but needs {share:.0%} of HBM"


def _cells(path, r) -> str:
    """| size | weights | arguments | temporaries | total (GiB per chip)"""
    size, method = path.stem.split("-")
    b = r["bytes_per_chip"]
    return (
        f"| {size} | {WEIGHTS[method]} | {b['arguments'] / GiB:.2f} GiB | "
        f"{b['temporaries'] / GiB:.2f} GiB | {b['total'] / GiB:.2f} GiB"
    )


def inference() -> str:
    lines = [
        "| size | weights | arguments | temporaries | total | planner total | fits 16 GiB (95%) "
        "| decode step all-reduce per token | compile |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path, r in _rows("inference"):
        reduce = r["programs"]["decode_step"]["collectives"]["all-reduce"]["bytes"]
        lines.append(
            f"{_cells(path, r)} | {r['plan']['total'] / GiB:.2f} GiB | {_fits(r)} | "
            f"{f'{reduce / 1e6:.1f} MB' if reduce else '-'} | {r['compile_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def host_memory() -> str:
    lines = [
        "| size | weights | HBM per chip: arguments | temporaries | total | host memory per chip "
        "(whole host) | fits 16 GiB (95%) | compile |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, r in _rows("host_memory"):
        host = r["bytes_per_chip"]["host_arguments"]
        lines.append(
            f"{_cells(path, r)} | {host / GiB:.2f} GiB ({host * r['chips'] / 1e9:.0f} GB) | "
            f"{_fits(r)} | {r['compile_seconds']:.0f} s |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(training(), inference(), host_memory(), sep="\n\n")
