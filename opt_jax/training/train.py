"""Training: loss, a pure jitted train step, evaluation, and `train_and_evaluate`.

`train_and_evaluate(config, workdir)` reads straight through: mesh, data, model + optimizer,
sharded init, restore, jitted step, loop. Resume order: the latest checkpoint in the workdir,
else `config.init_from`, else a fresh init. Batch `step` and the dropout key
`fold_in(key(seed), step)` are pure functions of the step, so a resumed run repeats an
uninterrupted one bit for bit (on CPU).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opt_jax.checkpoints import orbax_io as checkpoint
from opt_jax.checkpoints.hf import load_pretrained, stack_layers, unstack_layers
from opt_jax.config import OPTConfig
from opt_jax.losses import causal_lm_loss
from opt_jax.model import OPTForCausalLM, param_logical_axes
from opt_jax.parallel import roofline, sharding
from opt_jax.training import data
from opt_jax.training.experiment import model_config
from opt_jax.training.metrics import MetricsWriter
from opt_jax.validation import validate_token_ids

# Fields that define the architecture: a checkpoint must agree on all of them.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "ffn_dim",
    "num_attention_heads",
    "max_position_embeddings",
    "do_layer_norm_before",
    "_remove_final_layer_norm",
    "word_embed_proj_dim",
    "activation_function",
    "enable_bias",
    "layer_norm_elementwise_affine",
)


@struct.dataclass
class TrainState:
    """step: [] int32 steps taken (skipped ones included); params; opt_state; loss_avg: []
    float32 running mean of accepted losses (spike detection); skipped: [] int32 updates skipped."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    loss_avg: jax.Array
    skipped: jax.Array


# ---------------------------------------------------------------------------------------------
# Optimiser
# ---------------------------------------------------------------------------------------------
def make_schedule(optim, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then decay to final_lr_ratio x peak at num_steps."""
    peak, warmup = optim.learning_rate, optim.warmup_steps
    final = peak * optim.final_lr_ratio
    decay_steps = max(num_steps - warmup, 1)
    if optim.schedule == "linear":
        decay = optax.linear_schedule(peak, final, decay_steps)
    elif optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.final_lr_ratio)
    elif optim.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optim.schedule {optim.schedule!r} is not linear, cosine or constant")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


DECAYED = ("kernel", "embedding")  # weight matrices and embedding tables


def _decay_mask(params):
    # Weight decay on weight matrices and embeddings only, not on biases or LayerNorm
    # parameters. Decided by name, not rank: q/k/v biases are [heads, head_dim] and, with
    # scan_layers, every parameter has a leading layers axis.
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED, params)


def make_optimizer(optim, num_steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and the configured schedule."""
    parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    parts.append(
        optax.adamw(
            make_schedule(optim, num_steps),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def _loss_sum(params, batch, rng, model, deterministic):
    logits = model.apply(
        {"params": params},
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng},
    ).logits
    mean, count = causal_lm_loss(logits, batch["input_ids"], batch["attention_mask"])
    return mean * count, count


def train_step(state: TrainState, batch, rng, *, model, tx, optim):
    """One optimiser step over `batch` ([B, T] arrays), accumulating optim.grad_accum_steps
    micro-batches. Pure: randomness is fold_in(rng, step). Skips the update (but advances the
    step) when the loss or gradients are not finite, or the loss spikes.

    Returns:
      (new state, metrics dict of scalars)
    """
    accum = optim.grad_accum_steps
    step_rng = jax.random.fold_in(rng, state.step)
    # Micro-batch i takes rows i, i + accum, ...: every data-parallel device holds an equal share
    # of each micro-batch (a contiguous split would put micro-batch 0 on the first devices only).
    micro = jax.tree.map(lambda x: x.reshape((-1, accum) + x.shape[1:]).swapaxes(0, 1), batch)
    grad_fn = jax.value_and_grad(_loss_sum, has_aux=True)

    def accumulate(carry, inputs):
        index, mb = inputs
        (loss_sum, count), grads = grad_fn(
            state.params, mb, jax.random.fold_in(step_rng, index), model, False
        )
        total_loss, total_count, total_grads = carry
        total_grads = jax.tree.map(jnp.add, total_grads, grads)
        return (total_loss + loss_sum, total_count + count, total_grads), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (loss_sum, count, grads), _ = jax.lax.scan(
        accumulate, (jnp.zeros(()), jnp.zeros(()), zeros), (jnp.arange(accum), micro)
    )
    count = jnp.maximum(count, 1.0)
    loss = loss_sum / count
    # Back in each parameter's dtype: dividing by the float32 count would otherwise promote
    # bfloat16 gradients, and with them the Adam moments, changing the state's types after the
    # first step (a recompilation, and a restore that casts the moments back).
    grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, state.params)
    grad_norm = optax.tree.norm(grads)

    ok = jnp.ones((), bool)
    if optim.skip_nonfinite:
        ok &= jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if optim.spike_factor > 0:
        # Warm-up: the first steps, and any step before one has been accepted (no average yet).
        warm = (state.step < optim.spike_warmup_steps) | (state.step == state.skipped)
        ok &= warm | (loss <= optim.spike_factor * state.loss_avg)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    # Running mean of accepted losses: exact mean for 100 steps, then an EMA of 0.99.
    weight = jnp.maximum(1.0 / (state.step + 1 - state.skipped).astype(jnp.float32), 0.01)
    loss_avg = jnp.where(ok, state.loss_avg + weight * (loss - state.loss_avg), state.loss_avg)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        loss_avg=loss_avg,
        skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": new_state.skipped, "tokens": count}
    return new_state, metrics


def eval_step(params, batch, *, model):
    """(sum of token losses, token count) of a batch, dropout off."""
    return _loss_sum(params, batch, None, model, True)


# ---------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------
def _architecture_diff(a: OPTConfig, b: OPTConfig) -> list[str]:
    return [
        f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}"
        for f in ARCHITECTURE_FIELDS
        if getattr(a, f) != getattr(b, f)
    ]


def _load_init(path: str, dtype_fields: dict):
    """Params and config of `init_from`: an HF directory or an orbax params checkpoint."""
    if os.path.isdir(os.path.join(path, checkpoint.PARAMS_DIR)):
        return checkpoint.load_params(path, **dtype_fields)
    return load_pretrained(path, architecture="OPTForCausalLM", **dtype_fields)


def _model_overrides(config) -> dict:
    """The config.model fields that are set (dropout, dtypes, scan/remat/attention choices...)."""
    return {k: v for k, v in config.model.items() if k != "preset" and v is not None}


def _requests_architecture(config) -> bool:
    m = config.model
    return bool(m.preset) or any(m[f] is not None for f in ARCHITECTURE_FIELDS if f in m)


def _check_config_early(config, num_devices: int, workdir: str, latest: int | None) -> None:
    """Everything checkable before the data is prepared, so a bad flag fails in seconds."""
    for name in ("num_train_steps", "batch_size", "seq_len", "log_every_steps",
                 "keep_checkpoints", "stop_check_every_steps"):  # fmt: skip
        if config[name] <= 0:
            raise ValueError(f"config.{name} must be positive, got {config[name]}")
    if config.optim.grad_accum_steps <= 0:
        raise ValueError(
            f"optim.grad_accum_steps must be positive, got {config.optim.grad_accum_steps}"
        )
    if config.init_from and latest is not None:  # resuming a fine-tune
        limit = OPTConfig.from_hf(os.path.join(workdir, "model")).max_position_embeddings
    elif config.init_from:
        if not os.path.isdir(config.init_from):
            raise ValueError(f"init_from {config.init_from!r} is not a directory")
        limit = OPTConfig.from_hf(config.init_from).max_position_embeddings
    else:
        limit = model_config(config, config.data.vocab_size).max_position_embeddings
    if config.seq_len > limit:
        raise ValueError(
            f"seq_len {config.seq_len} exceeds the model's max_position_embeddings {limit}"
        )
    if latest is None:
        data.tokenizer_source(config)  # init_from without a tokenizer: an error now, not later
    _check_batch(config, num_devices)


def _check_config(config, cfg: OPTConfig, num_devices: int) -> None:
    if config.seq_len > cfg.max_position_embeddings:
        raise ValueError(
            f"seq_len {config.seq_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )
    _check_batch(config, num_devices)


def _check_batch(config, num_devices: int) -> None:
    if config.batch_size % num_devices:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {num_devices} data-parallel "
            "devices"
        )
    if (config.batch_size // num_devices) % config.optim.grad_accum_steps:
        raise ValueError(
            f"the per-device batch {config.batch_size // num_devices} is not divisible by "
            f"optim.grad_accum_steps {config.optim.grad_accum_steps}"
        )


def _agree_to_stop(signalled: bool, done: int, every: int) -> bool:
    """Whether every process stops after step `done`.

    A preemption signal may reach the processes of a multi-host job at different steps, but the
    save that follows is collective: one process must not decide alone. So with several
    processes the flags are all-gathered every `every` steps (config.stop_check_every_steps)
    and all stop together if any was signalled.
    """
    if jax.process_count() == 1:
        return signalled
    if done % every:
        return False
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(signalled))))


def _sample(cfg, params, tokenizer, config) -> str:
    from opt_jax.generation.text import generate_text

    model = OPTForCausalLM(cfg)
    room = cfg.max_position_embeddings - len(tokenizer.encode(config.sample_prompt))
    budget = min(config.sample_tokens, room)
    if budget < 1:
        return ""
    return generate_text(model, params, tokenizer, [config.sample_prompt], max_new_tokens=budget)[0]


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict:
    """Trains per `config`, checkpointing into `workdir`; returns the last logged metrics."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        with open(os.path.join(workdir, "train_config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    # -- Mesh: data / fsdp / tensor parallelism chosen by the config's mesh shape ------------
    mesh = sharding.mesh_from_config(config.mesh)
    rules = sharding.rules_from_config(config.sharding_rules)
    replicated = NamedSharding(mesh, P())
    batch_sharding = sharding.batch_sharding(mesh, rules)

    # -- Checks that need no data (tokenizing a corpus can take long) -------------------------
    ckpts = checkpoint.TrainCheckpoints(workdir, config.keep_checkpoints)
    latest = ckpts.latest_step()
    _check_config_early(config, sharding.data_parallel_size(mesh, rules), workdir, latest)

    # -- Data ----------------------------------------------------------------------------------
    tokenizer, train_tokens, eval_tokens = data.prepare(
        config, workdir, resuming=latest is not None
    )

    # -- Model and optimiser ----------------------------------------------------------------
    dtype_fields = {"dtype": config.model.dtype, "param_dtype": config.model.param_dtype}
    init_params = None
    if config.init_from and latest is None:
        init_cfg, init_params = _load_init(config.init_from, dtype_fields)
        cfg = dataclasses.replace(
            init_cfg, **_model_overrides(config), architecture="OPTForCausalLM"
        )
        if cfg.scan_layers != init_cfg.scan_layers:
            init_params = (stack_layers(init_params, cfg.num_hidden_layers) if cfg.scan_layers
                           else unstack_layers(init_params))  # fmt: skip
        if _requests_architecture(config):
            wanted = model_config(config, tokenizer.vocab_size)
            diff = _architecture_diff(wanted, init_cfg)
            if diff:
                raise ValueError(
                    f"init_from {config.init_from} does not match the model config: "
                    + "; ".join(diff)
                )
    elif config.init_from:  # resuming a fine-tune: the architecture was saved at its start
        saved = OPTConfig.from_hf(os.path.join(workdir, "model"))
        cfg = dataclasses.replace(saved, **_model_overrides(config))
    else:
        cfg = model_config(config, tokenizer.vocab_size)
    _check_config(config, cfg, sharding.data_parallel_size(mesh, rules))
    for name, tokens in (("training", train_tokens), ("evaluation", eval_tokens)):
        validate_token_ids(tokens[None, :], cfg.vocab_size, name=f"{name} tokens")
    model = OPTForCausalLM(cfg)
    tx = make_optimizer(config.optim, config.num_train_steps)
    train_ds = data.PackedDataset(train_tokens, config.seq_len, config.batch_size, config.seed)
    eval_ds = data.PackedDataset(eval_tokens, config.seq_len, config.batch_size, config.seed + 1)

    # -- Sharded init: shapes first, then state created directly with its shardings -------------
    def init_state(rng):
        params = nn.unbox(model.init(rng, jnp.ones((1, 1), jnp.int32))["params"])
        return _fresh_state(params, tx)

    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(init_state, rng)
    param_specs = param_logical_axes(cfg, model)
    sharding.check_divisible(abstract.params, param_specs, dict(mesh.shape), rules)
    state_specs = sharding.state_logical_specs(abstract, param_specs)
    state_sharding = sharding.logical_to_shardings(state_specs, mesh, rules)

    # -- Restore ------------------------------------------------------------------------------
    if latest is not None:
        meta = ckpts.read_meta(latest)
        saved = OPTConfig.from_hf(meta["model"])
        diff = _architecture_diff(cfg, saved)
        if diff:
            raise ValueError(
                f"workdir {workdir} holds a checkpoint of a different model: " + "; ".join(diff)
            )
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract,
            state_sharding,
        )
        state, _ = ckpts.restore(latest, target)
        start = int(state.step)
        print(f"[train] resumed from step {start}", flush=True)
    elif init_params is not None:
        params = jax.device_put(init_params, state_sharding.params)
        del init_params
        state = jax.jit(lambda p: _fresh_state(p, tx), out_shardings=state_sharding)(params)
        start = 0
        print(f"[train] initialised from {config.init_from}", flush=True)
    else:
        state = jax.jit(init_state, out_shardings=state_sharding)(rng)
        start = 0
    if is_main:
        cfg.save_hf(os.path.join(workdir, "model"))

    # -- Jitted steps ----------------------------------------------------------------------------
    step_fn = jax.jit(
        lambda s, b, r: train_step(s, b, r, model=model, tx=tx, optim=config.optim),
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(lambda p, b: eval_step(p, b, model=model))
    schedule = make_schedule(config.optim, config.num_train_steps)

    def global_batch(ds, step):
        local = ds.batch(step, jax.process_index(), jax.process_count())
        return {
            k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()
        }

    def evaluate(params):
        total, count = 0.0, 0.0
        for i in range(config.eval_batches):
            loss_sum, n = eval_fn(params, global_batch(eval_ds, i))
            total, count = total + float(loss_sum), count + float(n)
        loss = total / max(count, 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def save(step):
        ckpts.save(step, state, {"model": cfg.to_hf(), "step": step})

    # -- Loop -----------------------------------------------------------------------------------
    stop = {"signal": None}

    def on_sigterm(signum, frame):  # preemption: finish the step, save, exit
        stop["signal"] = signum

    try:
        previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        previous_handler = None
    writer = MetricsWriter(workdir, start, config.num_train_steps, enabled=is_main)
    tokens_per_step = config.batch_size * config.seq_len
    # Model FLOPs per step (forward + backward = 3 x forward), per device, for TFLOP/s and MFU.
    step_flops = 3 * roofline.model_flops_per_token(cfg, config.seq_len) * tokens_per_step
    device_flops = step_flops / jax.device_count()
    peaks = roofline.local_device_peaks(cfg.dtype)
    last, step_time, timer, stopping = {}, 0.0, time.time(), False
    try:
        with sharding.activate(mesh, rules):
            for step in range(start, config.num_train_steps):
                state, metrics = step_fn(state, global_batch(train_ds, step), rng)
                done = step + 1
                final = done == config.num_train_steps
                alone = jax.process_count() == 1
                if done % config.log_every_steps == 0 or final or (alone and stop["signal"]):
                    metrics = jax.device_get(metrics)
                    step_time = (time.time() - timer) / max(done - last.get("step", start), 1)
                    record = {
                        "loss": float(metrics["loss"]),
                        # The rate of the latest applied update: skipped steps do not advance
                        # the optimiser's count, so the schedule runs on applied updates.
                        "learning_rate": float(
                            schedule(max(done - int(metrics["skipped"]) - 1, 0))
                        ),
                        "grad_norm": float(metrics["grad_norm"]),
                        "skipped": int(metrics["skipped"]),
                        "tokens_per_s": tokens_per_step / step_time,
                        "step_time": step_time,
                        "tflops_per_device": device_flops / step_time / 1e12,
                        "epoch": train_ds.epoch_of(done),
                    }
                    if peaks:  # an accelerator whose data-sheet peak is known
                        record["mfu"] = device_flops / step_time / peaks["flops"]
                    if config.eval_every_steps and (done % config.eval_every_steps == 0 or final):
                        record.update(evaluate(state.params))
                    if config.sample_every_steps and (
                        done % config.sample_every_steps == 0 or final
                    ):
                        record["sample"] = _sample(cfg, state.params, tokenizer, config)
                    writer.write(done, record)
                    writer.progress(done, {k: v for k, v in record.items() if k != "sample"})
                    last, timer = {"step": done, **record}, time.time()
                stopping = _agree_to_stop(
                    stop["signal"] is not None, done, config.stop_check_every_steps
                )
                if done % config.checkpoint_every_steps == 0 or final or stopping:
                    save(done)
                if stopping:
                    why = f"signal {stop['signal']}" if stop["signal"] else "a peer's signal"
                    print(f"[train] {why}: saved step {done}, exiting", flush=True)
                    break
        ckpts.wait()
        if not stopping:
            _export(workdir, cfg, state.params, tokenizer, is_main)
    finally:
        ckpts.close()
        writer.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return last


def _export(workdir, cfg, params, tokenizer, is_main):
    """Params-only export for inference (generate.py --model WORKDIR/export), written by every
    process (orbax gathers the shards) and swapped in whole: a crash never leaves a half-written
    export."""
    export, staging = (os.path.join(workdir, n) for n in ("export", "export.tmp"))
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
    sharding.sync("export-staging-clean")
    checkpoint.save_params(staging, cfg, params)
    if is_main:
        tokenizer.save(staging)
        shutil.rmtree(export, ignore_errors=True)
        os.replace(staging, export)
    sharding.sync("export-done")


def _fresh_state(params, tx) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        loss_avg=jnp.zeros((), jnp.float32),
        skipped=jnp.zeros((), jnp.int32),
    )
