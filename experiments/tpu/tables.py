"""Prints the markdown tables of experiments/tpu/README.md from the JSON files beside it
(scripts/aot_compile.py's reports): python experiments/tpu/tables.py"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 2**30
WEIGHTS = {"none": "bfloat16", "int8": "int8", "int4": "int4 (g128)"}
ORDER = ["13b", "30b", "66b", "175b"]


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
    print(inference(), host_memory(), sep="\n\n")
