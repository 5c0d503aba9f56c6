"""The experiment config (ml_collections) every training run starts from, and the bridge from
its `model` group to the architecture (OPTConfig).

`configs/*.py` files build on `base_config()` (configs/opt.py carries the OPT paper's recipe).
Every field has a one-line comment and a type: fields that default to "unset" are typed
placeholders, so `--config.model.do_layer_norm_before=False` works from the command line, and
`lock_config=True` in scripts/train.py makes a mistyped override an error.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder

from opt_jax.config import OPTConfig, preset
from opt_jax.parallel.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every training config (the OPT recipe's optimiser settings)."""
    c = ml_collections.ConfigDict()
    # What the run learns (training/objectives.py): lm (causal language modelling), classification
    # (configs/classify.py) or qa (configs/qa.py, extractive question answering).
    c.task = "lm"
    # Architecture: `preset` names a public size (or "" for OPTConfig's defaults); every other
    # key overrides that OPTConfig field (unset keeps the preset's value).
    c.model = ml_collections.ConfigDict(
        dict(
            preset="",
            vocab_size=placeholder(int),  # unset: the tokenizer's size, rounded up to 8
            hidden_size=placeholder(int),  # model width D
            num_hidden_layers=placeholder(int),  # decoder layers
            ffn_dim=placeholder(int),  # MLP width F
            num_attention_heads=placeholder(int),  # heads N
            max_position_embeddings=placeholder(int),  # learned positions (context length)
            word_embed_proj_dim=placeholder(int),  # embedding width (opt-350m: 512 < D)
            do_layer_norm_before=placeholder(bool),  # pre-LN (True) or post-LN (opt-350m)
            dropout=0.1,  # OPT paper: dropout 0.1 throughout
            attention_dropout=0.0,  # on attention probabilities
            layerdrop=0.0,  # probability of skipping a whole layer in training
            activation_function=placeholder(str),  # relu for OPT; any of config.ACTIVATIONS
            dtype="float32",  # compute dtype (bfloat16 for mixed precision)
            param_dtype="float32",  # master weights
            scan_layers=False,  # nn.scan over layers: compile time independent of depth
            remat_policy="none",  # none | full | save_dots | save_dots_no_batch
            attention_impl="einsum",  # einsum | dot_product (cuDNN on GPUs) | flash (TPU Pallas)
            layer_memory="device",  # pinned_host: decode with the layers' kernels in host memory
        )
    )
    c.batch_size = 8  # global batch, in sequences
    c.seq_len = 256  # tokens per training sequence
    c.num_train_steps = 1000  # optimiser steps
    c.log_every_steps = 10  # metrics.jsonl / TensorBoard / progress line cadence
    c.eval_every_steps = 200  # held-out loss cadence (and at the last step)
    c.eval_batches = 4  # batches per evaluation
    c.checkpoint_every_steps = 200  # orbax save cadence (and at the last step / SIGTERM)
    # Multi-host: how often the processes agree whether one got SIGTERM (a tiny all-gather
    # that waits for the step). Keep it well inside the preemption notice (often ~30 s).
    c.stop_check_every_steps = 5
    c.keep_checkpoints = 2  # how many recent checkpoints to keep
    c.seed = 0  # parameter init, data order and dropout
    c.init_from = ""  # an HF directory or orbax params checkpoint to start from
    c.sample_every_steps = 0  # log a greedy sample of `sample_prompt` this often (0: never)
    c.sample_prompt = "def "  # prompt of the periodic samples
    c.sample_tokens = 32  # tokens per periodic sample

    # Device mesh (see sharding.py): within-slice sizes (one may be -1: all remaining devices)
    # and across-slice / across-node multipliers.
    c.mesh = ml_collections.ConfigDict(
        dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    )
    # Logical axis -> mesh axes, in priority order (sharding.DEFAULT_RULES).
    c.sharding_rules = DEFAULT_RULES

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 6e-4  # peak learning rate
    c.optim.warmup_steps = 100  # linear warmup from 0
    c.optim.schedule = "linear"  # linear | cosine | constant decay after warmup
    c.optim.final_lr_ratio = 0.1  # OPT: decay to 10% of the peak
    c.optim.b1 = 0.9  # AdamW beta1
    c.optim.b2 = 0.95  # OPT: beta2 0.95
    c.optim.eps = 1e-8  # AdamW epsilon
    c.optim.weight_decay = 0.1  # OPT: weight decay 0.1 (not on biases and LayerNorms)
    c.optim.grad_clip = 1.0  # global-norm clipping (0 disables)
    c.optim.grad_accum_steps = 1  # micro-batches per step (divides batch_size)
    c.optim.skip_nonfinite = True  # skip the update when loss or gradients are not finite
    c.optim.spike_factor = 0.0  # skip when loss > factor x running mean (0 disables)
    c.optim.spike_warmup_steps = 50  # steps before spike detection starts

    # LoRA (Hu et al. 2021): rank > 0 trains only adapters (PEFT's layout and init) on a frozen
    # model; WORKDIR/adapter is a PEFT adapter directory, WORKDIR/export the merged model.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0: off (full training)
    c.lora.alpha = 8.0  # scale alpha / rank
    c.lora.dropout = 0.0  # on the adapters' input
    c.lora.targets = ("q_proj$", "v_proj$")  # regexes over "decoder/layers_0/self_attn/q_proj"
    # QLoRA (Dettmers et al. 2023): "int8" | "int4" | "llm_int8" quantises the frozen base of a
    # fine-tune (init_from) before the adapters are added; "" keeps it in param_dtype.
    c.lora.quantize_base = ""

    c.data = ml_collections.ConfigDict()
    # "stdlib", comma-separated globs, .jsonl files, or a token store (scripts/prepare_data.py)
    c.data.source = "stdlib"
    c.data.mixture = ""  # token stores mixed by weight: "DIR_A:0.7,DIR_B:0.3" (replaces source)
    c.data.eval_source = ""  # a token store held out for evaluation ("": each store's tail)
    # sha256 of every store shard before training (process 0; sizes are always checked). It
    # reads the whole store: turn it off for stores too large to hash at every start.
    c.data.verify_store = True
    c.data.jsonl_field = "text"  # the text field of .jsonl records
    c.data.tokenizer = ""  # an HF tokenizer directory; "" trains one on the training split
    c.data.vocab_size = 8192  # size of a trained tokenizer
    c.data.eval_fraction = 0.02  # held out for evaluation: of files, or of each store's tokens
    c.data.max_files = 0  # use at most this many files (0: all)
    return c


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> OPTConfig:
    """Turns the experiment's `model` group into an OPTConfig.

    Args:
      vocab_size: used when the config leaves vocab_size unset (a trained tokenizer's size,
        rounded up to a multiple of 8 as OPT's 50265 ids are padded to 50272 rows).
    """
    m = dict(config.model)
    name = m.pop("preset")
    fields = {k: v for k, v in m.items() if v is not None}
    if vocab_size is not None and "vocab_size" not in fields:
        fields["vocab_size"] = -(-vocab_size // 8) * 8
    names = {f.name for f in dataclasses.fields(OPTConfig)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"config.model has fields OPTConfig does not know: {unknown}")
    fields.update(lora_fields(config))
    return preset(name, **fields) if name else OPTConfig(**fields)


def lora_fields(config: ml_collections.ConfigDict) -> dict:
    """The OPTConfig fields of the experiment's `lora` group."""
    lora = config.get("lora")
    if lora is None or not lora.rank:
        return {"lora_rank": 0}
    return {
        "lora_rank": lora.rank,
        "lora_alpha": float(lora.alpha),
        "lora_dropout": lora.dropout,
        "lora_targets": tuple(lora.targets),
    }
