"""Pretraining OPT-6.7b with the OPT paper's recipe (Zhang et al. 2022, Table 1).

  python scripts/train.py --config configs/opt_6_7b.py --workdir runs/opt_6_7b \
      --config.data.source='/data/corpus/*.jsonl' --config.data.tokenizer=/path/to/opt-tokenizer
"""

from opt_jax.training.experiment import pretrain_config


def get_config():
    return pretrain_config("6.7b")
