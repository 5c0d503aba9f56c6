"""Plots training and evaluation loss and the learning rate from WORKDIR/metrics.jsonl.

python scripts/plot_metrics.py --workdir demo_out   # writes demo_out/metrics.png
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

from opt_jax.training.metrics import read_metrics  # noqa: E402

flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
flags.DEFINE_string("out", None, "PNG path (default: WORKDIR/metrics.png).")


def main(argv):
    del argv
    workdir = flags.FLAGS.workdir
    try:
        records = read_metrics(workdir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not records:
        print(f"error: {workdir}/metrics.jsonl has no records yet", file=sys.stderr)
        sys.exit(2)
    steps = [r["step"] for r in records]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [r["loss"] for r in records], label="train loss")
    if evals:
        ax_loss.plot(*zip(*evals, strict=True), "o-", label="held-out loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r["learning_rate"] for r in records], color="tab:green")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    out = flags.FLAGS.out or os.path.join(workdir, "metrics.png")
    fig.savefig(out, dpi=100)
    print(f"[plot] wrote {out}")


if __name__ == "__main__":
    app.run(main)
