# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A few steps of fine-tuning
#
# The same pure `train_step` that `scripts/train.py` runs (AdamW with the OPT recipe's
# clipping and weight decay), driven by hand on a small text, with the loss plotted. Uses the
# `make demo` model if it exists, else a tiny random OPT; set `MODEL` for a real checkpoint.
# For real runs use `scripts/train.py --config configs/finetune.py` (checkpoints, exact resume,
# meshes).

# %%
import os
import sysconfig

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from ml_collections import ConfigDict

import opt_jax
from opt_jax.training import step as train_lib

MODEL = "../../demo_out/export"  # or "path/to/opt-125m"

library = sysconfig.get_paths()["stdlib"]
corpus = open(os.path.join(library, "json", "decoder.py")).read()
if os.path.isdir(MODEL):
    config, params = opt_jax.load_pretrained(MODEL)
    tokenizer = opt_jax.OPTTokenizer.from_pretrained(MODEL)
else:
    tokenizer = opt_jax.train_tokenizer([corpus], vocab_size=512)
    config = opt_jax.OPTConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=256,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    params = opt_jax.init_params(config, 0)
model = opt_jax.OPTForCausalLM(config.replace(dropout=0.1))

# %% [markdown]
# ## Data: the text packed into windows of 64 tokens

# %%
tokens = np.asarray(tokenizer.encode(corpus))
window, batch_size = 64, 8
windows = tokens[: len(tokens) // window * window].reshape(-1, window)
print(f"{len(tokens)} tokens -> {len(windows)} windows of {window}")


def batch_at(step):
    rows = np.random.RandomState(step).choice(len(windows), batch_size)
    ids = windows[rows]
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids)}


# %% [markdown]
# ## The step: AdamW, warmup, clipping; jitted once

# %%
optim = ConfigDict(
    dict(
        learning_rate=1e-3,
        warmup_steps=5,
        schedule="linear",
        final_lr_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip=1.0,
        grad_accum_steps=1,
        skip_nonfinite=True,
        spike_factor=0.0,
        spike_warmup_steps=0,
    )
)
steps = 30
tx = train_lib.make_optimizer(optim, steps)
state = train_lib.fresh_state(params, tx)
step_fn = jax.jit(
    lambda s, b: train_lib.train_step(s, b, jax.random.key(0), model=model, tx=tx, optim=optim)
)
losses = []
for i in range(steps):
    state, metrics = step_fn(state, batch_at(i))
    losses.append(float(metrics["loss"]))
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(losses)
ax.set_xlabel("step")
ax.set_ylabel("training loss (nats/token)")
plt.show()

# %% [markdown]
# ## Sample from the fine-tuned parameters

# %%
print(
    opt_jax.generate_text(
        opt_jax.OPTForCausalLM(config),
        state.params,
        tokenizer,
        ["def decode(self"],
        max_new_tokens=24,
    )[0]
)
