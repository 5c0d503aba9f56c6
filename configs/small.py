"""A larger sibling of the demo: 6 layers, 384 wide (12.4M parameters), on the same corpus.

  python scripts/train.py --config configs/small.py --workdir runs/small

The model experiments/compression/ compresses beside the demo's: big enough that 3- and 4-bit
quantisation and 50% sparsity visibly cost perplexity, small enough to train on 2 CPU cores in
about half an hour (1,500 steps of 16 x 128 tokens, the demo's recipe at a lower peak LR).
"""

import importlib.util
import os

# The demo's config, loaded by path (config files are not a package).
_spec = importlib.util.spec_from_file_location(
    "tiny", os.path.join(os.path.dirname(__file__), "tiny.py")
)
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


def get_config():
    c = tiny.get_config()
    c.model.hidden_size = 384
    c.model.num_hidden_layers = 6
    c.model.ffn_dim = 1536
    c.model.num_attention_heads = 6
    c.num_train_steps = 1500
    c.eval_every_steps = 250
    c.checkpoint_every_steps = 500
    c.sample_every_steps = 750
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    return c
