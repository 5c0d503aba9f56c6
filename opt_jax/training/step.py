"""One training step: the train state, the OPT recipe's optimiser, and pure jitted steps.

`train_step(state, batch, rng, *, model, tx, optim)` takes a [B, T] batch, accumulates
`optim.grad_accum_steps` micro-batches, clips, applies AdamW, and skips non-finite or spiking
updates. Randomness is `fold_in(rng, step)`, so a step is a pure function of (state, batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from opt_jax._deprecation import moved
from opt_jax.losses import causal_lm_loss
from opt_jax.param_tree import partition, unpartition


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


def decay_mask(params):
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
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def lm_loss(outputs, batch) -> tuple[jax.Array, jax.Array]:
    """The causal-LM objective of a batch: (mean next-token loss, counted targets)."""
    return causal_lm_loss(outputs.logits, batch["input_ids"], batch["attention_mask"])


def _loss_sum(params, batch, rng, model, deterministic, loss_fn=lm_loss):
    outputs = model.apply(
        {"params": params},
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng},
    )
    mean, count = loss_fn(outputs, batch)
    return mean * count, count


def train_step(state: TrainState, batch, rng, *, model, tx, optim, loss_fn=lm_loss, trainable=None):
    """One optimiser step over `batch` ([B, ...] arrays), accumulating optim.grad_accum_steps
    micro-batches. Pure: randomness is fold_in(rng, step). Skips the update (but advances the
    step) when the loss or gradients are not finite, or the loss spikes.

    Args:
      loss_fn: (model outputs, micro-batch) -> (mean loss, count); the default is the causal-LM
        loss, training/objectives.py has the classification and QA ones.
      trainable: None (train every parameter) or a predicate on parameter paths (LoRA:
        `lora.is_trained`). Only those are differentiated, clipped, updated and hold optimiser
        state (`fresh_state` with the same predicate); the others are constants of the step,
        so no gradient memory or weight-gradient matmul is spent on them.

    Returns:
      (new state, metrics dict of scalars)
    """
    accum = optim.grad_accum_steps
    step_rng = jax.random.fold_in(rng, state.step)
    # Micro-batch i takes rows i, i + accum, ...: every data-parallel device holds an equal share
    # of each micro-batch (a contiguous split would put micro-batch 0 on the first devices only).
    micro = jax.tree.map(lambda x: x.reshape((-1, accum) + x.shape[1:]).swapaxes(0, 1), batch)
    trained, frozen = partition(state.params, trainable)
    grad_fn = jax.value_and_grad(
        lambda t, mb, r: _loss_sum(unpartition(t, frozen), mb, r, model, False, loss_fn),
        has_aux=True,
    )

    def accumulate(carry, inputs):
        index, mb = inputs
        (loss_sum, count), grads = grad_fn(trained, mb, jax.random.fold_in(step_rng, index))
        total_loss, total_count, total_grads = carry
        total_grads = jax.tree.map(jnp.add, total_grads, grads)
        return (total_loss + loss_sum, total_count + count, total_grads), None

    zeros = jax.tree.map(jnp.zeros_like, trained)
    (loss_sum, count, grads), _ = jax.lax.scan(
        accumulate, (jnp.zeros(()), jnp.zeros(()), zeros), (jnp.arange(accum), micro)
    )
    count = jnp.maximum(count, 1.0)
    loss = loss_sum / count
    # Back in each parameter's dtype: dividing by the float32 count would otherwise promote
    # bfloat16 gradients, and with them the Adam moments, changing the state's types after the
    # first step (a recompilation, and a restore that casts the moments back).
    grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, trained)
    grad_norm = optax.tree.norm(grads)

    ok = jnp.ones((), bool)
    if optim.skip_nonfinite:
        ok &= jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if optim.spike_factor > 0:
        # Warm-up: the first steps, and any step before one has been accepted (no average yet).
        warm = (state.step < optim.spike_warmup_steps) | (state.step == state.skipped)
        ok &= warm | (loss <= optim.spike_factor * state.loss_avg)

    def update(grads, opt_state, trained):
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state

    # A skipped step leaves parameters and moments as they were. Under a cond, not a select of
    # new against old, so an accepted step (nearly all of them) writes every buffer once, in
    # place, instead of reading both versions of all of them.
    params, opt_state = jax.lax.cond(
        ok, update, lambda g, o, t: (t, o), grads, state.opt_state, trained
    )
    # Running mean of accepted losses: exact mean for 100 steps, then an EMA of 0.99.
    weight = jnp.maximum(1.0 / (state.step + 1 - state.skipped).astype(jnp.float32), 0.01)
    loss_avg = jnp.where(ok, state.loss_avg + weight * (loss - state.loss_avg), state.loss_avg)
    new_state = TrainState(
        step=state.step + 1,
        params=unpartition(params, frozen),
        opt_state=opt_state,
        loss_avg=loss_avg,
        skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": new_state.skipped, "tokens": count}
    return new_state, metrics


def eval_step(params, batch, *, model):
    """(sum of token losses, token count) of a batch, dropout off."""
    return _loss_sum(params, batch, None, model, True)


def fresh_state(params, tx, trainable=None) -> TrainState:
    """Step 0 of training `params` with `tx`; optimiser state for the `trainable` ones only
    (see train_step)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(partition(params, trainable)[0]),
        loss_avg=jnp.zeros((), jnp.float32),
        skipped=jnp.zeros((), jnp.int32),
    )


# `merge` collided with opt_jax.lora.merge (folding adapters in): it is param_tree.unpartition.
__getattr__ = moved(__name__, {"merge": "opt_jax.param_tree:unpartition"})
