"""attention_impl="flash" (Pallas flash attention for TPUs), run in Pallas' TPU interpret mode on
this CPU: same logits and gradients as the einsum reference on a left-padded batch.

(Jitted calls only: an eager, un-jitted call in interpret mode hung in a probe.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ragged_batch, random_tiny_model
from flax import traverse_util
from jax.experimental.pallas import tpu as pltpu

import opt_jax


@pytest.fixture(scope="module")
def models():
    config, reference, params = random_tiny_model(max_position_embeddings=128, dropout=0.0)
    flash = opt_jax.OPTForCausalLM(config.replace(attention_impl="flash"))
    return reference, flash, params


def _loss(model, ids, mask):
    def fn(params):
        logits = model.apply({"params": params}, ids, attention_mask=mask).logits
        return opt_jax.causal_lm_loss(logits, jnp.asarray(ids), jnp.asarray(mask))[0], logits

    return fn


@pytest.mark.slow
def test_flash_matches_einsum_logits_and_gradients(models):
    reference, flash, params = models
    ids, mask = ragged_batch(length=128)  # the kernel tiles keys by 128
    (_, ref_logits), ref_grads = jax.jit(
        jax.value_and_grad(_loss(reference, ids, mask), has_aux=True)
    )(params)
    with pltpu.force_tpu_interpret_mode():
        (_, logits), grads = jax.jit(jax.value_and_grad(_loss(flash, ids, mask), has_aux=True))(
            params
        )
        jax.block_until_ready(grads)
    real = mask == 1
    scale = np.abs(np.asarray(ref_logits)[real]).max()
    assert np.abs(np.asarray(logits - ref_logits)[real]).max() <= 1e-5 * scale
    flat, flat_ref = traverse_util.flatten_dict(grads), traverse_util.flatten_dict(ref_grads)
    for path in flat_ref:
        if path[-2:] == ("k_proj", "bias"):
            continue  # its true gradient is 0: float noise only
        err = np.abs(np.asarray(flat[path] - flat_ref[path])).max()
        assert err <= 1e-5 * np.abs(np.asarray(flat_ref[path])).max() + 1e-8, path


def test_flash_rejects_lengths_the_kernel_cannot_tile(models):
    _, flash, params = models
    with pytest.raises(ValueError, match="multiple of 128 .* got 100"):
        jax.eval_shape(lambda p: flash.apply({"params": p}, jnp.ones((1, 100), jnp.int32)), params)


def test_flash_configs_initialise_and_decode(models):
    """Init traces a one-token dummy, which the kernel cannot tile: it runs with einsum attention
    (same parameters); cached decode steps fall back to einsum (choose_impl), so generate works."""
    reference, flash, params = models
    fresh = opt_jax.init_params(flash.config, 0)
    want = opt_jax.init_params(reference.config, 0)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), fresh, want))
    ids, mask = ragged_batch(length=16)
    out = opt_jax.generate(flash, params, ids, mask, max_new_tokens=4)
    np.testing.assert_array_equal(
        out.sequences, opt_jax.generate(reference, params, ids, mask, max_new_tokens=4).sequences
    )


@pytest.mark.slow
def test_flash_trains_like_einsum(models):
    """Two optimiser steps of the training step (AdamW, the OPT recipe's clipping) with the flash
    kernel in interpret mode: the same losses as einsum attention, and each parameter's update
    the same within 0.1% of how far it moved (measured: at most 0.03%, the token table)."""
    from opt_jax.training import step as train
    from opt_jax.training.experiment import base_config

    reference, flash, params = models
    ids, mask = ragged_batch(length=128)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    optim = base_config().optim
    optim.warmup_steps, optim.schedule = 0, "constant"
    tx = train.make_optimizer(optim, 10)

    def two_steps(model):
        def run(state):
            losses = []
            for _ in range(2):
                state, metrics = train.train_step(
                    state, batch, jax.random.key(0), model=model, tx=tx, optim=optim
                )
                losses.append(metrics["loss"])
            return state, jnp.stack(losses)

        return jax.jit(run)(train.fresh_state(params, tx))

    ref_state, ref_losses = two_steps(reference)
    with pltpu.force_tpu_interpret_mode():
        state, losses = two_steps(flash)
        jax.block_until_ready(state)
    assert int(state.step) == 2 and float(losses[1]) < float(losses[0])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    flat, flat_ref, start = map(
        traverse_util.flatten_dict, (state.params, ref_state.params, params)
    )
    for path in flat_ref:
        if path[-2:] == ("k_proj", "bias"):
            continue  # its true gradient is 0: Adam scales float noise up to a full step
        moved = np.abs(np.asarray(flat_ref[path] - start[path])).max()
        err = np.abs(np.asarray(flat[path] - flat_ref[path])).max()
        assert err <= 1e-3 * moved, (path, err, moved)
