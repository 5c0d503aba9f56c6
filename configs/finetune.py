"""Fine-tuning a converted Hugging Face OPT checkpoint.

  python scripts/train.py --config configs/finetune.py --workdir runs/ft \
      --config.init_from=opt-125m --config.data.source='my_data/*.jsonl'

The architecture comes from the checkpoint (config.json); `model.dropout` and the dtypes can be
overridden. Resuming the workdir later continues from its own checkpoints.
"""

from opt_jax.training.experiment import base_config


def get_config():
    c = base_config()
    c.init_from = "<set --config.init_from>"  # required: an HF directory or orbax params checkpoint
    c.data.tokenizer = ""  # "" = init_from's own tokenizer; or another tokenizer directory
    c.batch_size = 8
    c.seq_len = 512
    c.num_train_steps = 1000
    c.optim.learning_rate = 5e-5
    c.optim.warmup_steps = 50
    c.optim.final_lr_ratio = 0.0
    c.model.dropout = 0.1
    c.checkpoint_every_steps = 250
    c.eval_every_steps = 250
    return c
