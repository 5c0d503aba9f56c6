"""Trains OPT from a config file.

  python scripts/train.py --config configs/tiny.py --workdir runs/tiny
  python scripts/train.py --config configs/opt.py:125m --workdir runs/125m \
      --config.data.source='~/corpus/*.jsonl' --config.optim.learning_rate=3e-4

Running again with the same --workdir resumes from its latest checkpoint. The run prints a short
summary; the whole resolved config is written to WORKDIR/train_config.json.
"""

import difflib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from opt_jax import sweeps
from opt_jax.parallel import distributed
from opt_jax.training import train

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports go here.", required=True)
flags.mark_flags_as_required(["config"])


distributed.define_flags()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    f = flags.FLAGS
    distributed.initialize_from_flags()  # before any other JAX call
    train.train_and_evaluate(f.config, f.workdir)


def _unknown_override(argv) -> str | None:
    """The first --config.a.b=... override naming no field of the config file, explained."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    if path is None:
        return None
    config = sweeps.load_config(path)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        keys = arg[len("--config.") :].split("=", 1)[0].split(".")
        node = config
        for depth, key in enumerate(keys):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if key not in fields:
                where = ".".join(keys[:depth]) or "the config"
                close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]}?)" if close else ""
                return (
                    f"{arg.split('=', 1)[0]}: {where} has no field {key!r}{hint}; "
                    f"its fields: {', '.join(sorted(fields))}"
                )
            node = node[key]
    return None


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections' report of an unknown field
        try:
            message = _unknown_override(argv[1:])
        except Exception:  # the override check itself failed: fall back to the raw error
            message = None
        print(f"error: {message or e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
