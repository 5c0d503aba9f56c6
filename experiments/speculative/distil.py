"""Distils a small draft model from a target for speculative decoding (the study's draft).

  python experiments/speculative/distil.py --target runs/small --out runs/draft \
      --hidden 256 --layers 2 --steps 1500

The draft is a fresh OPT with the target's tokenizer, vocabulary and positions and its own
width / depth, trained to match the target's next-token distribution: the loss is the forward
KL divergence KL(p_target || q_draft) over every position of windows of the target's own
training data (its workdir's data/train.npy). Matching the whole distribution, rather than the
data's next token, is what makes a draft's argmax agree with the target's (DistillSpec, Zhou et
al. 2024, compares the choices). A draft trained on the data alone (the demo model of
experiments/speculative/README.md) agreed with this target on 45% of greedy tokens.

Writes a Hugging Face directory (config.json, safetensors, the target's tokenizer files) that
`opt_jax.load_pretrained` and scripts/benchmark_speculative.py --draft read. Every
--eval_every steps it prints the KL and the greedy agreement (the share of held-out positions
where the draft's argmax is the target's) on fixed held-out windows.
"""

import os
import shutil
import time

from absl import app, flags

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt",
)  # fmt: skip

flags.DEFINE_string("target", None, "The target's training workdir.", required=True)
flags.DEFINE_string(
    "out", None, "Where to write the draft (a Hugging Face directory).", required=True
)
flags.DEFINE_integer("hidden", 256, "Draft width.")
flags.DEFINE_integer("layers", 2, "Draft decoder layers.")
flags.DEFINE_integer("heads", 4, "Draft attention heads.")
flags.DEFINE_integer("steps", 1500, "Optimiser steps.")
flags.DEFINE_integer("batch", 16, "Windows per step.")
flags.DEFINE_integer("seq_len", 128, "Tokens per window.")
flags.DEFINE_float("lr", 2e-3, "Peak learning rate (linear warm-up, cosine decay to 10%).")
flags.DEFINE_integer("eval_every", 250, "Report held-out KL and agreement every this many steps.")
flags.DEFINE_integer("seed", 0, "Initialisation and data order.")


def kl_and_agreement(target_logits, draft_logits, mask):
    """Mean KL(p || q) over real positions and the share where argmax q == argmax p.

    target_logits / draft_logits: [B, T, V]; mask: [B, T] (1 = real token)."""
    import jax
    import jax.numpy as jnp

    log_p = jax.nn.log_softmax(target_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(draft_logits.astype(jnp.float32), axis=-1)
    kl = (jnp.exp(log_p) * (log_p - log_q)).sum(-1)  # [B, T]
    agree = jnp.argmax(target_logits, -1) == jnp.argmax(draft_logits, -1)
    count = jnp.maximum(mask.sum(), 1)
    return (kl * mask).sum() / count, (agree * mask).sum() / count


def main(argv):
    del argv
    import jax
    import numpy as np
    import optax

    import opt_jax
    from opt_jax.checkpoints import orbax_io

    f = flags.FLAGS
    target_dir = orbax_io.resolve_checkpoint(f.target)
    t_config, t_params = opt_jax.load_pretrained(target_dir, architecture="OPTForCausalLM")
    if f.hidden % f.heads:
        raise ValueError(f"--hidden {f.hidden} is not a multiple of --heads {f.heads}")
    d_config = t_config.replace(
        hidden_size=f.hidden, word_embed_proj_dim=f.hidden, ffn_dim=4 * f.hidden,
        num_hidden_layers=f.layers, num_attention_heads=f.heads,
    )  # fmt: skip
    target, draft = opt_jax.OPTForCausalLM(t_config), opt_jax.OPTForCausalLM(d_config)
    params = opt_jax.init_params(d_config, f.seed)
    n_draft = sum(x.size for x in jax.tree.leaves(params))
    n_target = sum(x.size for x in jax.tree.leaves(t_params))
    print(f"[distil] target {n_target / 1e6:.1f}M parameters, draft {n_draft / 1e6:.1f}M")

    data_dir = os.path.join(f.target, "data")
    train = np.load(os.path.join(data_dir, "train.npy"), mmap_mode="r")
    held_out = np.load(os.path.join(data_dir, "eval.npy"))
    rng = np.random.default_rng(f.seed)

    def windows(tokens, starts):
        ids = np.stack([np.asarray(tokens[s : s + f.seq_len]) for s in starts]).astype(np.int32)
        return ids, np.ones_like(ids)

    eval_ids, eval_mask = windows(
        held_out, np.linspace(0, len(held_out) - f.seq_len, 4 * f.batch).astype(int)
    )
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, f.lr, min(100, f.steps // 10), f.steps, end_value=f.lr / 10
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95))
    opt_state = tx.init(params)

    def logits(model, p, ids, mask):
        return model.apply({"params": p}, ids, attention_mask=mask).logits

    @jax.jit
    def step(params, opt_state, t_params, ids, mask):
        teacher = jax.lax.stop_gradient(logits(target, t_params, ids, mask))

        def loss(p):
            return kl_and_agreement(teacher, logits(draft, p, ids, mask), mask)

        (kl, agree), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, kl, agree

    @jax.jit
    def evaluate(params, t_params):
        return kl_and_agreement(
            logits(target, t_params, eval_ids, eval_mask),
            logits(draft, params, eval_ids, eval_mask),
            eval_mask,
        )

    def save(params):
        opt_jax.save_pretrained(f.out, d_config, params)
        for name in TOKENIZER_FILES:  # the target's tokenizer: the two must share it
            if os.path.isfile(os.path.join(target_dir, name)):
                shutil.copy(os.path.join(target_dir, name), f.out)

    start = time.perf_counter()
    for i in range(1, f.steps + 1):
        ids, mask = windows(train, rng.integers(0, len(train) - f.seq_len, f.batch))
        params, opt_state, kl, agree = step(params, opt_state, t_params, ids, mask)
        if i % f.eval_every == 0 or i == f.steps:
            held_kl, held_agree = evaluate(params, t_params)
            print(
                f"[distil] step {i}: train KL {float(kl):.3f}, held-out KL {float(held_kl):.3f}, "
                f"greedy agreement {float(held_agree):.3f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            save(params)  # a stopped run keeps its latest draft (the last step saves too)
    print(f"[distil] wrote {f.out}")


if __name__ == "__main__":
    app.run(main)
