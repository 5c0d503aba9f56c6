"""Pretraining OPT-1.3b with the OPT paper's recipe (Zhang et al. 2022, Table 1).

  python scripts/train.py --config configs/opt_1_3b.py --workdir runs/opt_1_3b \
      --config.data.source='/data/corpus/*.jsonl' --config.data.tokenizer=/path/to/opt-tokenizer
"""

from opt_jax.training.experiment import pretrain_config


def get_config():
    return pretrain_config("1.3b")
