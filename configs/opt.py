"""Pretraining OPT with the OPT paper's recipe, for any public size.

  python scripts/train.py --config configs/opt.py:125m --workdir runs/opt-125m \
      --config.data.source='/data/corpus/*.jsonl' --config.data.tokenizer=/path/to/opt-125m

Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models", arXiv:2205.01068.
Section 2.2 (training setup) and Table 1 (per-size settings), as written below: AdamW with
beta1 0.9, beta2 0.95 and weight decay 0.1; a linear schedule warming up from 0 over 375M tokens
(2000 steps for 175B) and decaying to 10% of the peak over 300B tokens; dropout 0.1 throughout;
gradient clipping at 1.0 (lowered to 0.3 mid-run for 175B, Section 2.5); sequences of 2048
tokens; the per-size peak learning rate and batch size of Table 1.

What to expect: this reproduces the recipe, not the run: the paper's 180B-token corpus
(Section 3) is not public in full, and 300B tokens of 125m training are ~2.3e20 FLOPs (6 x
parameters x tokens): decades on a CPU, hours on a TPU v5p-64 slice. Judge a run by its
held-out loss curve against the released checkpoints' perplexity on the same text.
"""

from opt_jax.training.experiment import base_config

# Table 1: size -> (peak learning rate, batch size in 2048-token sequences). The table's
# "0.5M / 1M / 2M / 4M" token batches are 2^19 ... 2^22 tokens: 256 ... 2048 sequences.
TABLE_1 = {
    "125m": (6.0e-4, 256),
    "350m": (3.0e-4, 256),
    "1.3b": (2.0e-4, 512),
    "2.7b": (1.6e-4, 512),
    "6.7b": (1.2e-4, 1024),
    "13b": (1.0e-4, 2048),
    "30b": (1.0e-4, 2048),
    "66b": (0.8e-4, 1024),
    "175b": (1.2e-4, 1024),
}
SEQ_LEN = 2048  # every size was trained on 2048-token sequences
TRAIN_TOKENS = 300e9  # the schedule spans 300B tokens
WARMUP_TOKENS = 375e6  # warmup of the smaller models; 175B warmed up over 2000 steps


def get_config(size: str = "125m"):
    if size not in TABLE_1:
        raise ValueError(f"configs/opt.py:SIZE takes one of {', '.join(TABLE_1)}; got {size!r}")
    lr, batch_size = TABLE_1[size]
    batch_tokens = batch_size * SEQ_LEN
    c = base_config()
    c.model.preset = size
    c.model.dropout = 0.1
    c.seq_len = SEQ_LEN
    c.batch_size = batch_size
    c.num_train_steps = int(TRAIN_TOKENS // batch_tokens)
    c.optim.learning_rate = lr
    c.optim.warmup_steps = 2000 if size == "175b" else int(WARMUP_TOKENS // batch_tokens)
    c.optim.schedule = "linear"
    c.optim.final_lr_ratio = 0.1
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.data.tokenizer = ""  # point at a real OPT tokenizer directory to reuse its vocabulary
    c.data.vocab_size = 50265  # OPT's GPT-2 BPE, if a tokenizer must be trained
    return c
