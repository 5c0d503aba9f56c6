"""Trains OPT from a config file.

  python scripts/train.py --config configs/tiny.py --workdir runs/tiny
  python scripts/train.py --config configs/opt_125m.py --workdir runs/125m \
      --config.data.source='~/corpus/*.jsonl' --config.optim.learning_rate=3e-4

Running again with the same --workdir resumes from its latest checkpoint.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from opt_jax import distributed, train

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports go here.", required=True)
flags.mark_flags_as_required(["config"])


distributed.define_flags()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    f = flags.FLAGS
    distributed.initialize_from_flags()  # before any other JAX call
    if jax.process_index() == 0:
        print(f.config)
    train.train_and_evaluate(f.config, f.workdir)


if __name__ == "__main__":
    app.run(main)
