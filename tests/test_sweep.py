"""The sweep runner: overrides checked before anything runs, one fresh process per run,
finished runs skipped, a killed sweep resumed from checkpoints, the report regenerated, and
the commands / SLURM script for other schedulers."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opt_jax import sweeps

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
RUNS = [{"optim.learning_rate": 3e-3, "seed": 0}, {"optim.learning_rate": 3e-3, "seed": 1}]


@pytest.fixture
def study(tmp_path):
    """(config path, sweep path, workdir) of a tiny two-run sweep."""
    config = tmp_path / "config.py"
    config.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from train_helpers import tiny_train_config\n\n\n"
        "def get_config():\n"
        "    return tiny_train_config(num_train_steps=12, checkpoint_every_steps=2,\n"
        "                             eval_every_steps=6)\n"
    )
    sweep = tmp_path / "sweep.py"
    sweep.write_text(f"def get_sweep():\n    return {RUNS!r}\n")
    return str(config), str(sweep), tmp_path / "runs"


def _sweep(study, *flags, check=True):
    config, sweep, workdir = study
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "scripts/sweep.py", "--config", config, "--sweep", sweep,
         "--workdir", str(workdir), *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=check,
    )  # fmt: skip


def test_a_killed_sweep_resumes_and_finished_runs_are_skipped(study):
    config, sweep, workdir = study
    first = workdir / sweeps.run_name(RUNS[0])
    # Start the sweep and kill it (and its training process) once run 0 has a checkpoint.
    proc = subprocess.Popen(
        [sys.executable, "scripts/sweep.py", "--config", config, "--sweep", sweep,
         "--workdir", str(workdir)],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300

    def committed():  # a finished checkpoint (orbax writes *.orbax-checkpoint-tmp first)
        folder = first / "checkpoints"
        return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())

    while not committed() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert sweeps.status(str(first))["status"] == "interrupted"

    out = _sweep(study).stdout
    assert f"1/2 {sweeps.run_name(RUNS[0])}: resuming" in out
    assert f"2/2 {sweeps.run_name(RUNS[1])}: starting" in out
    assert "resuming at step" in (first / "train.log").read_text()
    rows = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert [r["overrides"] for r in rows] == RUNS
    assert all(r["status"] == "done" and r["steps"] == 12 for r in rows)
    assert all(r["best_eval_loss"] <= r["final_eval_loss"] for r in rows)
    metrics = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert sorted({m["step"] for m in metrics}) == list(range(1, 13))
    table = (workdir / "results.md").read_text()
    assert "2/2" in table and "±" in table  # two seeds pooled: mean ± spread
    assert (workdir / "eval_loss.png").read_bytes()[:4] == b"\x89PNG"

    # Again: nothing left to train.
    size = (first / "train.log").stat().st_size
    out = _sweep(study).stdout
    assert out.count("done, skipped") == 2 and (first / "train.log").stat().st_size == size
    # The report regenerates from the runs alone.
    for name in ("results.jsonl", "results.md", "eval_loss.png"):
        (workdir / name).unlink()
    _sweep(study, "--report")
    assert len((workdir / "results.jsonl").read_text().splitlines()) == 2
    assert (workdir / "eval_loss.png").exists()


@pytest.mark.parametrize(
    "runs, message",
    [
        ([{"optim.lr": 1e-3}], r"run 0 \(lr=0.001\): no config field optim.lr"),
        ([{"model.hidden_size": "wide"}], r"run 0 \(hidden_size=wide\): model.hidden_size='wide'"),
        ([{"seed": 1}, {"model.do_layer_norm_before": "no"}], r"run 1 .*do_layer_norm_before='no'"),
        ([{"nonsense.key": 1}], r"no config field nonsense"),
    ],
)
def test_bad_overrides_fail_before_anything_runs(study, runs, message):
    config, sweep, workdir = study
    Path(sweep).write_text(f"def get_sweep():\n    return {runs!r}\n")
    proc = _sweep(study, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert not workdir.exists()


def test_commands_and_slurm_script(study):
    config, sweep, workdir = study
    lines = _sweep(study, "--print_commands").stdout.strip().splitlines()
    assert len(lines) == 2
    assert all("scripts/train.py --config" in line and "--config.seed=" in line for line in lines)
    assert f"--workdir {workdir / sweeps.run_name(RUNS[1])}" in lines[1]
    _sweep(study, "--slurm")
    script = (workdir / "sweep.slurm").read_text()
    assert "#SBATCH --array=0-1" in script and script.count("scripts/train.py") == 2
    assert not any(p.is_dir() for p in workdir.iterdir())  # nothing ran
