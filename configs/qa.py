"""Fine-tune OPT for extractive question answering (OPTForQuestionAnswering, as HF's
question-answering example does on SQuAD).

  python scripts/train.py --config configs/qa.py --workdir runs/qa \
      --config.init_from=demo_out/export      # or an HF directory such as opt-125m

Data: SQuAD v1.1 / v2.0 JSON as published (`data.train_file`, `data.eval_file`). Contexts
longer than a window of `seq_len` tokens are split into windows overlapping by
`data.doc_stride` tokens; answers are the best of the `data.n_best_size` start x end logits of
at most `data.max_answer_length` tokens (and "" in v2.0 when the no-answer score is higher).
Both files default to the built-in task (opt_jax/tasks/builtin.py): "What does NAME do?" over
contexts listing four functions of a standard-library module with their docstrings' first
sentences, plus one unanswerable question per context (SQuAD v2.0 format; 5543 train / 1127
dev questions on Python 3.11).

Eval rows of metrics.jsonl carry eval_loss, eval_exact_match and eval_f1 (the official
script's 0-100 scale); WORKDIR/predictions.json holds the last evaluation's answers
({question id: text}) for the official script; WORKDIR/export is an HF directory that
transformers' OPTForQuestionAnswering and opt_jax.load_pretrained load.

Expected from the demo model (`make demo`, 4.3M parameters): exact match 21.4 and F1 26.2
after 600 steps (measured 2026-11-27), 4.7 minutes on 2 AVX-512 CPU cores. That is barely
above answering "" everywhere (19.3 / 19.3: the unanswerable fifth of the questions): a model
this small, pretrained on code, mostly learns the no-answer position first. The run exercises
the whole pipeline; a real OPT checkpoint is what to fine-tune for good answers.
"""

from opt_jax.training.experiment import base_config


def get_config():
    c = base_config()
    c.task = "qa"
    c.init_from = "<set --config.init_from>"  # an HF directory or our export, with a tokenizer
    c.data.train_file = "builtin"  # SQuAD JSON; "builtin" (with eval_file) = the built-in task
    c.data.eval_file = "builtin"
    c.data.doc_stride = 32  # tokens shared by consecutive windows of a long context
    c.data.max_answer_length = 30  # longest answer, in tokens
    c.data.n_best_size = 20  # start and end candidates per window
    c.batch_size = 16
    c.seq_len = 128
    c.num_train_steps = 600
    c.model.dropout = 0.1
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 60
    c.optim.final_lr_ratio = 0.0
    c.optim.weight_decay = 0.01
    c.log_every_steps = 10
    c.eval_every_steps = 300
    c.checkpoint_every_steps = 300
    return c
