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
# # opt_jax quickstart
#
# Load a model, tokenize, generate with two strategies, and score text. Runs on a CPU in about
# a minute. By default it uses the model `make demo` trains (`demo_out/export`) if it exists,
# else a tiny random OPT (nothing is downloaded). To use a real checkpoint, point `MODEL` at a
# local Hugging Face directory, e.g. after
# `huggingface-cli download facebook/opt-125m --local-dir opt-125m`.

# %%
import os
import sysconfig

import jax
import matplotlib.pyplot as plt
import numpy as np

import opt_jax

MODEL = "../../demo_out/export"  # or "path/to/opt-125m": any HF directory or our export

if os.path.isdir(MODEL):
    config, params = opt_jax.load_pretrained(MODEL)
    tokenizer = opt_jax.OPTTokenizer.from_pretrained(MODEL)
else:  # a tiny random OPT with a tokenizer trained on a few standard-library files
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
n_params = sum(x.size for x in jax.tree.leaves(params))
print(
    f"{n_params / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, "
    f"vocabulary {config.vocab_size}"
)

# %% [markdown]
# ## Tokenize
# OPT's contract: GPT-2 byte-level BPE, `</s>` (id 2) prepended to every prompt, left padding
# with `<pad>` (id 1).

# %%
prompts = ["def __init__(self", "import os\n"]
ids, mask = tokenizer.encode_batch(prompts)
print(ids)
print([tokenizer.decode(row[m == 1]) for row, m in zip(ids, mask, strict=True)])

# %% [markdown]
# ## Generate: greedy, then sampling
# Options have transformers' names. Sampling values such as `temperature` and `top_p` are
# traced: changing them does not recompile.

# %%
greedy = opt_jax.generate_text(model, params, tokenizer, prompts, max_new_tokens=24)
sampled = opt_jax.generate_text(
    model,
    params,
    tokenizer,
    prompts,
    max_new_tokens=24,
    do_sample=True,
    temperature=0.8,
    top_p=0.9,
    seed=0,
)
for prompt, g, s in zip(prompts, greedy, sampled, strict=True):
    print(repr(prompt), "| greedy:", repr(g), "| sampled:", repr(s))

# %% [markdown]
# ## Score text
# The mean next-token loss of each text (padding ignored), and the per-token log-probabilities.

# %%
texts = ["import os\nimport sys\n", "the the the the the the"]
ids, mask = tokenizer.encode_batch(texts)
logits = model.apply({"params": params}, ids, attention_mask=mask).logits
logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
token_logp = np.take_along_axis(np.asarray(logp), ids[:, 1:, None], axis=-1)[..., 0]
real = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
for text, lp, r in zip(texts, token_logp, real, strict=True):
    print(f"{text!r}: mean loss {-lp[r].mean():.3f} nats/token")

fig, ax = plt.subplots(figsize=(6, 2.5))
for text, lp, r in zip(texts, token_logp, real, strict=True):
    ax.plot(-lp[r], marker="o", label=repr(text)[:24])
ax.set_xlabel("token")
ax.set_ylabel("loss (nats)")
ax.legend()
plt.show()
