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
# # A tour inside OPT
#
# Attention maps, the logit lens, head ablation and activation patching with
# `opt_jax.interventions`. Uses the `make demo` model if it exists, else a tiny random OPT;
# set `MODEL` to a local HF directory (e.g. opt-125m) for a real one.

# %%
import os
import sysconfig

import jax
import matplotlib.pyplot as plt
import numpy as np

import opt_jax
from opt_jax import interventions as iv

MODEL = "../../demo_out/export"  # or "path/to/opt-125m"

if os.path.isdir(MODEL):
    config, params = opt_jax.load_pretrained(MODEL)
    tokenizer = opt_jax.OPTTokenizer.from_pretrained(MODEL)
else:
    library = sysconfig.get_paths()["stdlib"]
    texts = [open(os.path.join(library, f)).read() for f in ("os.py", "json/__init__.py")]
    tokenizer = opt_jax.train_tokenizer(texts, vocab_size=512)
    config = opt_jax.OPTConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        ffn_dim=256,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    params = opt_jax.init_params(config, 0)
model = opt_jax.OPTForCausalLM(config)
text = "import os\nimport sys\n\ndef main():\n    return os.getcwd()\n"
ids, mask = tokenizer.encode_batch([text])
tokens = [tokenizer.decode([t]) for t in ids[0]]
print(len(tokens), "tokens")

# %% [markdown]
# ## Attention maps
# `output_attentions=True` returns each layer's probabilities [batch, heads, query, key].

# %%
out = model.apply({"params": params}, ids, attention_mask=mask, output_attentions=True)
layer = config.num_hidden_layers - 1
fig, axes = plt.subplots(1, config.num_attention_heads, figsize=(3 * config.num_attention_heads, 3))
for head, ax in enumerate(np.atleast_1d(axes)):
    ax.imshow(np.asarray(out.attentions[layer][0, head]), cmap="viridis")
    ax.set_title(f"layer {layer}, head {head}")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The logit lens
# Every layer's residual stream read out through the final LayerNorm and the tied head: how
# early does the model "know" the next token? (The last layer's readout is the model's output.)

# %%
lens = iv.logit_lens(model, params, ids, mask)  # [layers, batch, tokens, vocab]
logp = jax.nn.log_softmax(lens, axis=-1)
targets = ids[0, 1:]
next_logp = np.take_along_axis(np.asarray(logp[:, 0, :-1]), targets[None, :, None], axis=-1)[..., 0]
fig, ax = plt.subplots(figsize=(8, 3))
image = ax.imshow(next_logp, aspect="auto", cmap="magma")
ax.set_xlabel("position (predicting the next token)")
ax.set_ylabel("layer")
fig.colorbar(image, label="log p(next token)")
plt.show()

# %% [markdown]
# ## Head ablation
# Zero each head in turn (`head_mask`) and measure the change in the text's loss.


# %%
def loss_of(output):
    loss, _ = opt_jax.causal_lm_loss(output.logits, ids, mask)
    return float(loss)


base = loss_of(out)
effect = np.zeros((config.num_hidden_layers, config.num_attention_heads))
for layer in range(config.num_hidden_layers):
    for h in range(config.num_attention_heads):
        effect[layer, h] = loss_of(iv.ablate_heads(model, params, ids, mask, [(layer, h)])) - base
fig, ax = plt.subplots(figsize=(4, 3))
image = ax.imshow(effect, cmap="coolwarm")
ax.set_xlabel("head")
ax.set_ylabel("layer")
fig.colorbar(image, label="loss increase (nats)")
plt.show()

# %% [markdown]
# ## Activation patching
# Run a corrupted prompt (one token changed), and restore the clean run's residual stream at
# one layer and position at a time: where does the information that matters for the final
# prediction live?

# %%
corrupt = ids.copy()
corrupt[0, 3] = (corrupt[0, 3] + 7) % config.vocab_size
names = [f"layers_{i}.residual" for i in range(config.num_hidden_layers)]
clean_out, clean = iv.capture(model, params, ids, mask, names=names)
target = int(jax.numpy.argmax(clean_out.logits[0, -1]))
corrupt_logit = float(model.apply({"params": params}, corrupt, mask).logits[0, -1, target])
restored = np.zeros((config.num_hidden_layers, ids.shape[1]))
for i, name in enumerate(names):
    for position in range(ids.shape[1]):
        patched = iv.patch(model, params, corrupt, mask, {name: (clean[name], [position])})
        restored[i, position] = float(patched.logits[0, -1, target]) - corrupt_logit
fig, ax = plt.subplots(figsize=(8, 3))
image = ax.imshow(restored, aspect="auto", cmap="viridis")
ax.set_xlabel("patched position")
ax.set_ylabel("layer")
fig.colorbar(image, label="restored logit of the clean prediction")
plt.show()
