"""Base config of the LayerNorm-placement study: the demo's recipe on a smaller, faster model.

  python scripts/sweep.py --config experiments/ln_placement/config.py \
      --sweep experiments/ln_placement/sweep.py --workdir runs/ln_placement

Each run: 300 steps of 16 x 128 tokens of standard-library source (400 files), a 128-wide OPT;
about a minute on 2 CPU cores.
"""

from opt_jax.training.experiment import base_config


def get_config():
    c = base_config()
    c.model.hidden_size = 128
    c.model.num_hidden_layers = 4  # swept
    c.model.ffn_dim = 512
    c.model.num_attention_heads = 4
    c.model.max_position_embeddings = 128
    c.model.dropout = 0.0
    c.batch_size = 16
    c.seq_len = 128
    c.num_train_steps = 300
    c.log_every_steps = 25
    c.eval_every_steps = 50
    c.eval_batches = 8
    c.checkpoint_every_steps = 150
    c.optim.learning_rate = 2e-3  # swept
    c.optim.warmup_steps = 20
    c.data.max_files = 400
    c.data.vocab_size = 2048
    return c
