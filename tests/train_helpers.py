"""A shrunken training config for tests, and a subprocess runner with fault injection.

Run as a script:
  python train_helpers.py WORKDIR OVERRIDES_JSON [--kill-after-save STEP] [--sigterm-at STEP]
      [--devices N] [--distributed PORT NUM_PROCESSES PROCESS_ID]
--kill-after-save SIGKILLs the trainer right after the (asynchronous) save of STEP has started,
i.e. while it is being written; --sigterm-at sends SIGTERM after STEP (to process K only with
--sigterm-process K); --devices emulates N CPU
devices; --distributed joins a multi-process job on localhost.
"""

import json
import os
import signal
import sys

from opt_jax.training.experiment import base_config


def tiny_train_config(**overrides):
    c = base_config()
    c.model.vocab_size = None
    c.model.hidden_size = 32
    c.model.num_hidden_layers = 2
    c.model.ffn_dim = 64
    c.model.num_attention_heads = 2
    c.model.max_position_embeddings = 64
    c.model.dropout = 0.1  # exercised: resume must reproduce dropout masks too
    c.batch_size = 4
    c.seq_len = 32
    c.num_train_steps = 12
    c.log_every_steps = 1
    c.eval_every_steps = 6
    c.eval_batches = 2
    c.checkpoint_every_steps = 4
    c.keep_checkpoints = 2
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 3
    c.data.max_files = 40
    c.data.eval_fraction = 0.25
    c.data.vocab_size = 300
    for key, value in overrides.items():
        target = c
        *path, last = key.split(".")
        if isinstance(value, list):
            value = tuple(value)
        for part in path:
            target = target[part]
        target[last] = value
    return c


def main():
    workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
    args = sys.argv[3:]
    from opt_jax.parallel import distributed

    # Before anything else touches JAX: emulated devices, and joining a multi-process job.
    devices = int(args[args.index("--devices") + 1]) if "--devices" in args else None
    if "--distributed" in args:
        port, count, index = args[args.index("--distributed") + 1 :][:3]
        distributed.initialize(f"127.0.0.1:{port}", int(count), int(index), devices)
    elif devices:
        distributed.initialize(local_device_count=devices)
    import jax

    from opt_jax.checkpoints import orbax_io as checkpoint
    from opt_jax.training import metrics, train

    if "--kill-after-save" in args:
        kill_step = int(args[args.index("--kill-after-save") + 1])
        original = checkpoint.TrainCheckpoints.save

        def save_then_die(self, step, state, meta):
            original(self, step, state, meta)
            if step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)  # the async write is still in flight

        checkpoint.TrainCheckpoints.save = save_then_die
    if "--sigterm-at" in args:
        term_step = int(args[args.index("--sigterm-at") + 1])
        original_write = metrics.MetricsWriter.write

        # --sigterm-process K: only process K is signalled (a preemption seen by one host).
        only = args[args.index("--sigterm-process") + 1] if "--sigterm-process" in args else None

        def write_then_term(self, step, record):
            original_write(self, step, record)
            if step == term_step and only in (None, str(jax.process_index())):
                os.kill(os.getpid(), signal.SIGTERM)

        metrics.MetricsWriter.write = write_then_term
    train.train_and_evaluate(tiny_train_config(**overrides), workdir)


if __name__ == "__main__":
    main()
