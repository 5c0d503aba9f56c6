"""Runs a config-driven ablation: a base config plus a sweep file of dotted overrides.

  python scripts/sweep.py --config configs/tiny.py --sweep experiments/ln_placement/sweep.py \
      --workdir runs/ln_placement                     # trains every run not yet done
  python scripts/sweep.py ... --print_commands        # one scripts/train.py line per run
  python scripts/sweep.py ... --slurm                 # writes WORKDIR/sweep.slurm (job array)
  python scripts/sweep.py ... --report                # refreshes results.jsonl / .md / .png

Runs train one after another, each in a fresh process, in WORKDIR/<run name>; running the
command again skips finished runs and resumes interrupted ones from their checkpoints.
Every override is checked against the config before anything runs.
"""

import os
import sys

from absl import app, flags

from opt_jax import sweeps

flags.DEFINE_string("config", None, "Base config (path or path:arg).", required=True)
flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep().", required=True)
flags.DEFINE_string("workdir", None, "Where the runs and the report go.", required=True)
flags.DEFINE_bool("print_commands", False, "Print one scripts/train.py command per run.")
flags.DEFINE_bool("slurm", False, "Write WORKDIR/sweep.slurm, a SLURM job-array script.")
flags.DEFINE_bool("report", False, "Only collect the results of the runs so far.")


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        config, runs = sweeps.load_config(f.config), sweeps.load_sweep(f.sweep)
        sweeps.check_runs(config, runs)
        if f.print_commands:
            print("\n".join(sweeps.commands(f.config, f.workdir, runs)))
            return
        if f.slurm:
            os.makedirs(f.workdir, exist_ok=True)
            path = os.path.join(f.workdir, "sweep.slurm")
            with open(path, "w") as out:
                out.write(sweeps.slurm_script(f.config, f.workdir, runs))
            print(f"[sweep] wrote {path} ({len(runs)} array tasks): sbatch {path}")
            return
        if f.report:
            os.makedirs(f.workdir, exist_ok=True)
            rows = sweeps.report(f.workdir, runs)
        else:
            rows = sweeps.run_sweep(f.config, f.sweep, f.workdir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(sweeps.markdown_table(rows))
    print(f"[sweep] results: {f.workdir}/results.jsonl, results.md, eval_loss.png")
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
