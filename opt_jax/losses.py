"""The causal-LM loss: next-token cross-entropy with padding ignored."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def causal_lm_loss(
    logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of predicting input_ids[:, 1:] from logits[:, :-1].

    A target counts when it and the token before it are both real. That equals transformers'
    loss with labels = input_ids at those targets and -100 elsewhere; it differs from HF's
    habit of labelling every real token only at the first real token of a left-padded row,
    whose prediction would come from a padding position.

    Args:
      logits: [B, T, V] (any float dtype; computed in float32).
      input_ids: [B, T] int tokens (the labels, unshifted).
      attention_mask: [B, T] 1 for real tokens; None counts every target.

    Returns:
      (mean loss over counted targets, number of counted targets). The mean is 0 when no
      target counts.
    """
    targets = input_ids[:, 1:]
    weights = (
        jnp.ones(targets.shape, jnp.float32)
        if attention_mask is None
        else (attention_mask[:, 1:] * attention_mask[:, :-1]).astype(jnp.float32)
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), targets
    )
    count = weights.sum()
    return (losses * weights).sum() / jnp.maximum(count, 1.0), count
