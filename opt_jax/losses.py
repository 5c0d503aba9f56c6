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
    # Shift the labels, not the logits: logits[:, :-1] would copy the whole [B, T - 1, V] float
    # array (and its gradient back into a padded [B, T, V] one), the largest tensors of a step.
    # The last position predicts nothing and gets weight 0.
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    if attention_mask is None:
        weights = jnp.ones(input_ids.shape, jnp.float32)
    else:
        mask = attention_mask.astype(jnp.float32)
        weights = mask[:, 1:] * mask[:, :-1]
    weights = jnp.pad(weights[:, : input_ids.shape[1] - 1], ((0, 0), (0, 1)))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    count = weights.sum()
    return (losses * weights).sum() / jnp.maximum(count, 1.0), count
