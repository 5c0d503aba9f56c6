"""Logits processors and sampling warpers, with transformers' semantics, as pure JAX functions,
and the three steps every decoding strategy applies: `process_logits`, `warp_logits`, `stop_hit`.

Axis legend: N rows (batch, or batch x beams), L token-buffer length, V vocabulary.

Every function takes float32 logits [N, V] and returns them modified. Bans write -inf, as
transformers does, so a banned token can never be chosen by argmax, sampling or beam top-k.
History-based processors read the token buffer `tokens` [N, L] with `valid` [N, L] marking the
real tokens (prompt and generated); padding is never counted as "seen".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opt_jax.generation.config import GenerationConfig

NEG_INF = -jnp.inf


def _row_scatter(shape, tokens, values, combine: str):
    """[N, V] array from scattering values [N, L] at token ids [N, L] per row."""
    rows = jnp.arange(tokens.shape[0])[:, None]
    base = jnp.zeros(shape, values.dtype)
    return getattr(base.at[rows, tokens], combine)(values)


def seen_mask(tokens, valid, vocab_size: int):
    """[N, V] bool: which ids occur among the real tokens of each row."""
    return _row_scatter((tokens.shape[0], vocab_size), tokens, valid, "max")


def token_counts(tokens, valid, vocab_size: int):
    """[N, V] int32: how often each id occurs among the real tokens of each row."""
    return _row_scatter((tokens.shape[0], vocab_size), tokens, valid.astype(jnp.int32), "add")


def repetition_penalty(logits, seen, penalty: float):
    """CTRL's penalty (Keskar et al. 2019), as transformers applies it: seen tokens' positive
    scores are divided by `penalty`, negative ones multiplied."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def presence_frequency_penalty(logits, counts, presence, frequency):
    """OpenAI-style additive penalties on the generated tokens' counts.

    logits, counts: [B, V]; presence, frequency: scalars, or [B, 1] per-row values.
    """
    return logits - presence * (counts > 0) - frequency * counts


def _before(x, end, m: int):
    """x [N, L] -> [N, m]: each row's m slots before its `end` (a scalar or [N]; clipped at 0)."""
    start = jnp.maximum(jnp.broadcast_to(end, x.shape[:1]) - m, 0)
    return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, m))(x, start)


def ends_with(tokens, valid, end, sequence: tuple[int, ...]):
    """[N] bool: whether tokens[:, end - len(sequence):end] equals `sequence` (all real).

    `end` is a traced scalar or [N] (exclusive, per row); too short a history never matches.
    """
    m = len(sequence)
    window, window_valid = _before(tokens, end, m), _before(valid, end, m)  # [N, m]
    match = (window == jnp.asarray(sequence, tokens.dtype)).all(-1) & window_valid.all(-1)
    return match & (end >= m)


def ban_bad_words(logits, tokens, valid, end, bad_words_ids):
    """Bans the last token of each bad-word sequence whose other tokens end the history."""
    for words in bad_words_ids:
        *prefix, last = words
        hit = (
            ends_with(tokens, valid, end, tuple(prefix))
            if prefix
            else jnp.ones(logits.shape[0], bool)
        )
        logits = logits.at[:, last].set(jnp.where(hit, NEG_INF, logits[:, last]))
    return logits


def ban_repeated_ngrams(logits, tokens, valid, end, n: int):
    """no_repeat_ngram_size: bans every token that would complete an n-gram already in the row.

    Args:
      end: traced scalar or [N], the number of buffer slots written so far (exclusive end).
    """
    length = tokens.shape[1]
    if n > length:
        return logits
    starts = length - n + 1
    end = jnp.broadcast_to(end, tokens.shape[:1])[:, None]  # [N, 1]
    # windows[:, j, k] = tokens[:, j + k]: every n-gram of the buffer.  [N, starts, n]
    windows = jnp.stack([tokens[:, k : k + starts] for k in range(n)], axis=-1)
    windows_valid = jnp.stack([valid[:, k : k + starts] for k in range(n)], axis=-1).all(-1)
    prefix = _before(tokens, end[:, 0], n - 1)  # [N, n-1]
    prefix_valid = _before(valid, end[:, 0], n - 1).all(-1)
    complete = jnp.arange(starts)[None, :] + n - 1 < end  # the n-gram lies fully in the history
    match = (windows[:, :, : n - 1] == prefix[:, None, :]).all(-1)
    match &= windows_valid & complete & prefix_valid[:, None] & (end >= n - 1)
    banned = _row_scatter(logits.shape, windows[:, :, n - 1], match, "max")
    return jnp.where(banned, NEG_INF, logits)


def ban_tokens(logits, token_ids):
    """Suppress a fixed set of ids (suppress_tokens, or EOS before min_new_tokens)."""
    if not token_ids:
        return logits
    return logits.at[:, jnp.asarray(token_ids)].set(NEG_INF)


def ban_from(logits, first_unused: int):
    """Bans ids >= first_unused: the padded embedding rows no tokenizer id maps to
    (50265-50271 for real OPT)."""
    ids = jnp.arange(logits.shape[-1])
    return jnp.where(ids[None, :] >= first_unused, NEG_INF, logits)


# ---------------------------------------------------------------------------------------------
# Sampling warpers (applied in transformers' order: temperature, top-k, top-p, min-p, typical)
# ---------------------------------------------------------------------------------------------
# min_keep is transformers' min_tokens_to_keep: the number of most likely tokens a filter never
# removes (1 when sampling; len(eos) + 1 in beam sampling).
def top_k_filter(logits, k: int, min_keep: int = 1):
    """Keeps the k (at least min_keep) highest scores and anything tied with the last one, as
    transformers does."""
    k = min(max(k, min_keep), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def _scatter_sorted(mask_sorted, order):
    """Undo a per-row sort: mask_sorted[:, i] belongs to column order[:, i]."""
    rows = jnp.arange(order.shape[0])[:, None]
    return jnp.zeros_like(mask_sorted).at[rows, order].set(mask_sorted)


def top_p_filter(logits, top_p: float, min_keep: int = 1):
    """Nucleus filtering: drops the least likely tokens whose total mass is <= 1 - top_p,
    always keeping the min_keep most likely ones."""
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = (cumulative <= 1 - top_p).at[:, -max(min_keep, 1) :].set(False)
    return jnp.where(_scatter_sorted(remove, order), NEG_INF, logits)


def min_p_filter(logits, min_p: float, min_keep: int = 1):
    """Drops tokens whose probability is below min_p times the top token's probability, keeping
    the min_keep most likely ones."""
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = min_p * probs.max(-1, keepdims=True)
    remove = probs < threshold
    if min_keep > 1:
        top = jax.lax.top_k(probs, min(min_keep, probs.shape[-1]))[1]
        rows = jnp.arange(probs.shape[0])[:, None]
        remove = remove.at[rows, top].set(False)
    return jnp.where(remove, NEG_INF, logits)


def typical_filter(logits, mass: float, min_keep: int = 1):
    """Locally typical sampling (Meister et al. 2022), transformers' TypicalLogitsWarper; the
    min_keep most typical tokens are always kept."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    entropy = -jnp.nansum(logp * p, axis=-1, keepdims=True)
    shifted = jnp.abs(-logp - entropy)
    order = jnp.argsort(shifted, axis=-1)
    sorted_shifted = jnp.take_along_axis(shifted, order, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    last = jnp.minimum((cumulative < mass).sum(-1, keepdims=True), logits.shape[-1] - 1)
    remove = sorted_shifted > jnp.take_along_axis(sorted_shifted, last, axis=-1)
    remove = remove.at[:, : max(min_keep, 1)].set(False)
    return jnp.where(_scatter_sorted(remove, order), NEG_INF, logits)


# ---------------------------------------------------------------------------------------------
# What every strategy applies, driven by a GenerationConfig. `gen_config` may be the static program
# (`GenerationConfig.program()`: traced fields are None, `gen_config.active` says which are on) and
# `values` the traced scalars (`GenerationConfig.values()`, possibly as jax arrays).
# ---------------------------------------------------------------------------------------------
def process_logits(
    gen_config: GenerationConfig, values, scores, tokens, valid, end, num_generated, generated
):
    """Applies the history-based processors, in transformers' order.

    Args:
      values: the traced options by name (scalars).
      scores: [N, V] float32 (raw logits, or log-probs in beam search).
      tokens, valid: [N, L] token buffer and its real-token mask.
      end: traced scalar or [N], slots written so far. num_generated: traced scalar or [N, 1].
      generated: [L] bool, which slots hold generated (not prompt) tokens.
    """
    vocab = scores.shape[-1]
    if "repetition_penalty" in gen_config.active:
        scores = repetition_penalty(
            scores, seen_mask(tokens, valid, vocab), values["repetition_penalty"]
        )
    if {"presence_penalty", "frequency_penalty"} & gen_config.active:
        counts = token_counts(tokens, valid & generated[None, :], vocab)
        scores = presence_frequency_penalty(
            scores, counts, values["presence_penalty"], values["frequency_penalty"]
        )
    if gen_config.no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, tokens, valid, end, gen_config.no_repeat_ngram_size)
    if gen_config.bad_words_ids:
        scores = ban_bad_words(scores, tokens, valid, end, gen_config.bad_words_ids)
    if gen_config.min_new_tokens > 0:
        scores = jnp.where(
            num_generated < gen_config.min_new_tokens,
            ban_tokens(scores, gen_config.eos_token_id),
            scores,
        )
    if gen_config.suppress_tokens:
        scores = ban_tokens(scores, gen_config.suppress_tokens)
    if gen_config.vocab_limit is not None and gen_config.vocab_limit < vocab:
        scores = ban_from(scores, gen_config.vocab_limit)
    return scores


def warp_logits(gen_config: GenerationConfig, values, scores, min_keep: int = 1):
    """Sampling warpers in transformers' order: temperature, top-k, top-p, min-p, typical.

    min_keep: tokens each filter must leave (transformers' min_tokens_to_keep: 1 when sampling,
    `gen_config.beam_min_keep` in beam sampling).
    """
    # Always divided (a traced 1.0 is exact), so changing the temperature never recompiles.
    scores = scores / values["temperature"]
    if gen_config.top_k:
        scores = top_k_filter(scores, gen_config.top_k, min_keep)
    if "top_p" in gen_config.active:
        scores = top_p_filter(scores, values["top_p"], min_keep)
    if "min_p" in gen_config.active:
        scores = min_p_filter(scores, values["min_p"], min_keep)
    if "typical_p" in gen_config.active:
        scores = typical_filter(scores, values["typical_p"], min_keep)
    return scores


def stop_hit(gen_config: GenerationConfig, tokens, valid, end, new_tokens):
    """[N] bool: the token just written is an EOS or completes a stop sequence."""
    hit = jnp.isin(new_tokens, jnp.asarray(gen_config.eos_token_id, new_tokens.dtype))
    for sequence in gen_config.stop_sequences:
        hit |= ends_with(tokens, valid, end, sequence)
    return hit
