"""Training metrics: WORKDIR/metrics.jsonl (one JSON object per logged step), TensorBoard
event files in WORKDIR/tensorboard, and a progress line with ETA. Only process 0 writes."""

from __future__ import annotations

import json
import os
import sys
import time


class MetricsWriter:
    """Appends metrics by step; on resume, drops records past the restored step first, so
    steps executed again after a crash are logged once."""

    def __init__(self, workdir: str, resume_step: int, total_steps: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.total_steps = total_steps
        self.start_step, self.start_time = resume_step, time.time()
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [
                    line for line in f if line.strip() and json.loads(line)["step"] <= resume_step
                ]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        from tensorboardX import SummaryWriter

        # purge_step hides events past the restored step from a previous, interrupted run.
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def progress(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        rate = done / max(time.time() - self.start_time, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))]
        parts.append(f"eta {_duration(eta)}")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def _plain(value):
    try:
        value = value.item()
    except AttributeError:
        pass
    return value


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def read_metrics(workdir: str) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl.

    Raises:
      FileNotFoundError: naming the path, when the file does not exist (no training has
        logged a step in WORKDIR yet, or WORKDIR is not a training workdir).
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        what = "is not a directory" if not os.path.isdir(workdir) else "has no metrics.jsonl"
        raise FileNotFoundError(
            f"no metrics at {path}: {workdir} {what} (is it the --workdir of a training run "
            "that has logged a step?)"
        )
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
