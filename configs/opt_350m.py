"""Pretraining OPT-350m with the OPT paper's recipe (Zhang et al. 2022, Table 1).

  python scripts/train.py --config configs/opt_350m.py --workdir runs/opt_350m \
      --config.data.source='/data/corpus/*.jsonl' --config.data.tokenizer=/path/to/opt-tokenizer
"""

from opt_jax.training.experiment import pretrain_config


def get_config():
    return pretrain_config("350m")
