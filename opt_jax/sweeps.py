"""Config-driven ablations: a sweep is a base config plus a list of dotted overrides.

A sweep file is plain Python next to its study's README:

    def get_sweep():
        return [{"model.do_layer_norm_before": ln, "optim.learning_rate": lr, "seed": s}
                for ln in (True, False) for lr in (1e-3, 3e-3) for s in (0, 1)]

`run_sweep` checks every override against the config before anything runs, then trains each
run in a fresh process (`scripts/train.py`, so one crash does not end the sweep) in
WORKDIR/<run name>; a second invocation skips finished runs and resumes interrupted ones from
their checkpoints. `report` collects results.jsonl, a markdown table (mean and spread over
seeds) and a plot of every run's held-out loss. `commands` / `slurm_script` hand the same
runs to any scheduler.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from opt_jax.training.metrics import read_metrics

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train.py"
STATUS_FILE = "sweep_status.json"


def _module(path: str, name: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str):
    """The ConfigDict of a config spec "path" or "path:arg" (as scripts/train.py --config)."""
    path, _, arg = spec.partition(":")
    module = _module(path, "_sweep_config")
    return module.get_config(arg) if arg else module.get_config()


def load_sweep(path: str) -> list[dict]:
    """The runs of a sweep file: get_sweep() -> list of {dotted key: value} dicts."""
    module = _module(path, "_sweep_file")
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} defines no get_sweep()")
    runs = module.get_sweep()
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs) or not runs:
        raise ValueError(f"{path}: get_sweep() must return a non-empty list of dicts")
    return runs


def run_name(overrides: dict) -> str:
    """A directory name made of the overrides ("do_layer_norm_before=False,seed=1"), with a
    hash suffix when the readable form would be too long."""
    parts = [f"{key.split('.')[-1]}={value}" for key, value in sorted(overrides.items())]
    name = re.sub(r"[^A-Za-z0-9=.,_-]", "_", ",".join(parts)) or "base"
    if len(name) > 120:
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
        name = name[:100] + "_" + digest
    return name


def _set(config, key: str, value) -> None:
    *path, leaf = key.split(".")
    node = config
    for depth, part in enumerate(path):
        if not hasattr(node, "keys") or part not in node:
            raise KeyError(".".join(path[: depth + 1]))
        node = node[part]
    if not hasattr(node, "keys") or leaf not in node:
        fields = list(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(leaf, fields, n=1)
        raise KeyError(key + (f" (did you mean {'.'.join(path + [close[0]])}?)" if close else ""))
    node[leaf] = value


def check_runs(config, runs: list[dict]) -> None:
    """Every override names a field of the config and has its type, or a one-line ValueError
    names the run and the key. Nothing is run or written before this passes."""
    names = [run_name(r) for r in runs]
    for i, overrides in enumerate(runs):
        trial = copy.deepcopy(config)
        for key, value in overrides.items():
            try:
                _set(trial, key, value)
            except KeyError as e:
                raise ValueError(f"run {i} ({names[i]}): no config field {e.args[0]}") from None
            except (TypeError, ValueError) as e:
                raise ValueError(f"run {i} ({names[i]}): {key}={value!r}: {e}") from None
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"runs with identical overrides: {sorted(duplicates)}")


def _flag(key: str, value) -> str:
    return f"--config.{key}={value}"


def command(config_spec: str, workdir: str, overrides: dict, python: str = "python") -> list[str]:
    """The scripts/train.py command line of one run."""
    return [python, str(TRAIN_SCRIPT), "--config", config_spec,
            "--workdir", os.path.join(workdir, run_name(overrides)),
            *(_flag(k, v) for k, v in overrides.items())]  # fmt: skip


def commands(config_spec: str, workdir: str, runs: list[dict]) -> list[str]:
    """One shell command line per run, for any scheduler."""
    return [shlex.join(command(config_spec, workdir, r)) for r in runs]


def slurm_script(config_spec: str, workdir: str, runs: list[dict]) -> str:
    """A SLURM job-array script running run $SLURM_ARRAY_TASK_ID (resumable, like run_sweep)."""
    lines = "\n".join(f"  {shlex.quote(c)}" for c in commands(config_spec, workdir, runs))
    return f"""#!/bin/bash
#SBATCH --job-name=opt_jax_sweep
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --output={workdir}/slurm_%a.out
# Written by scripts/sweep.py. Submit with: sbatch {workdir}/sweep.slurm
# Resubmitting resumes each unfinished run from its latest checkpoint.
RUNS=(
{lines}
)
eval "${{RUNS[$SLURM_ARRAY_TASK_ID]}}"
"""


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def status(run_dir: str) -> dict:
    """{"status": done | failed | interrupted | pending, "wall_time_s", "returncode"}."""
    record = {"wall_time_s": 0.0, "returncode": None}
    path = os.path.join(run_dir, STATUS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            record.update(json.load(f))
    if os.path.isdir(os.path.join(run_dir, "export")) and record.get("returncode") == 0:
        record["status"] = "done"
    elif record.get("returncode") not in (None, 0):
        record["status"] = "failed"
    elif os.path.isdir(os.path.join(run_dir, "checkpoints")):
        record["status"] = "interrupted"
    else:
        record["status"] = "pending"
    return record


def run_sweep(config_spec: str, sweep_path: str, workdir: str, *, log=print) -> list[dict]:
    """Checks the sweep, then trains every run that is not done, one after another, each in a
    fresh process; returns the report rows."""
    config, runs = load_config(config_spec), load_sweep(sweep_path)
    check_runs(config, runs)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump({"config": config_spec, "sweep": sweep_path, "runs": runs}, f, indent=2)
    for i, overrides in enumerate(runs):
        run_dir = os.path.join(workdir, run_name(overrides))
        before = status(run_dir)
        if before["status"] == "done":
            log(f"[sweep] {i + 1}/{len(runs)} {run_name(overrides)}: done, skipped")
            continue
        verb = "resuming" if before["status"] in ("interrupted", "failed") else "starting"
        log(f"[sweep] {i + 1}/{len(runs)} {run_name(overrides)}: {verb}")
        os.makedirs(run_dir, exist_ok=True)
        start = time.time()
        with open(os.path.join(run_dir, "train.log"), "a") as out:
            code = subprocess.call(
                command(config_spec, workdir, overrides, python=sys.executable),
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        record = {"returncode": code, "wall_time_s": before["wall_time_s"] + time.time() - start}
        with open(os.path.join(run_dir, STATUS_FILE), "w") as f:
            json.dump(record, f)
        if code:
            log(f"[sweep] {run_name(overrides)} failed (exit {code}); see {run_dir}/train.log")
        report(workdir, runs)
    return report(workdir, runs)


# ---------------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------------
def _metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return read_metrics(run_dir)


def collect(workdir: str, runs: list[dict]) -> list[dict]:
    """One row per run: overrides, status, final / best eval loss, steps, tokens/s, wall time."""
    rows = []
    for overrides in runs:
        run_dir = os.path.join(workdir, run_name(overrides))
        metrics, state = _metrics(run_dir), status(run_dir)
        evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
        rates = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
        rows.append({
            "run": run_name(overrides),
            "overrides": overrides,
            "status": state["status"],
            "final_eval_loss": evals[-1] if evals else None,
            "best_eval_loss": min(evals) if evals else None,
            "steps": metrics[-1]["step"] if metrics else 0,
            "tokens_per_s": statistics.median(rates) if rates else None,
            "wall_time_s": state["wall_time_s"],
        })  # fmt: skip
    return rows


def _grouped(rows: list[dict]) -> tuple[list[str], dict]:
    """(swept keys other than the seed, {their values: rows})."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    varying = [
        k for k in keys if k != "seed" and len({repr(r["overrides"].get(k)) for r in rows}) > 1
    ]
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r["overrides"].get(k) for k in varying), []).append(r)
    return varying, groups


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown_table(rows: list[dict]) -> str:
    """Grouped by the swept keys (seeds pooled): mean ± sample standard deviation."""
    varying, groups = _grouped(rows)
    header = [k.split(".")[-1] for k in varying] + [
        "runs done", "final eval loss", "best eval loss", "tokens/s"
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for values, members in groups.items():
        done = [r for r in members if r["final_eval_loss"] is not None]
        rates = [r["tokens_per_s"] for r in members if r["tokens_per_s"]]
        lines.append("| " + " | ".join(
            [str(v) for v in values]
            + [f"{sum(r['status'] == 'done' for r in members)}/{len(members)}",
               _mean_spread([r["final_eval_loss"] for r in done]),
               _mean_spread([r["best_eval_loss"] for r in done]),
               f"{statistics.median(rates):.0f}" if rates else "-"]
        ) + " |")  # fmt: skip
    return "\n".join(lines)


def plot(workdir: str, rows: list[dict], path: str) -> None:
    """Every run's held-out loss curve, colored by group (seeds share a color)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varying, groups = _grouped(rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for g, (values, members) in enumerate(groups.items()):
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(varying, values, strict=True))
        for j, r in enumerate(members):
            evals = [(m["step"], m["eval_loss"]) for m in _metrics(os.path.join(workdir, r["run"]))
                     if "eval_loss" in m]  # fmt: skip
            if evals:
                ax.plot(*zip(*evals, strict=True), "o-", color=colors[g % len(colors)],
                        alpha=0.8, label=(label or "runs") if j == 0 else None)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(workdir: str, runs: list[dict]) -> list[dict]:
    """Writes WORKDIR/results.jsonl, results.md and eval_loss.png; returns the rows."""
    rows = collect(workdir, runs)
    with open(os.path.join(workdir, "results.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown_table(rows) + "\n")
    plot(workdir, rows, os.path.join(workdir, "eval_loss.png"))
    return rows
