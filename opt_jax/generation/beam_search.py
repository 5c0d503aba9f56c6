"""Beam search with transformers' semantics (its vectorised implementation since v4.50), in JAX.

Axis legend: B batch, K num_beams, C = 2K candidates kept per step (enough that K of them can
continue even if K just finished), L token-buffer length, V vocabulary, N = B * K model rows.

Per step: add each running beam's log-probs to its score, take the top C continuations over
K x V, move the best K unfinished ones into the running set (reordering the KV cache to
follow them), and merge the finished ones (scored with the length penalty) into a per-row
top-K list of hypotheses. The loop stops by transformers' rules (early_stopping True / False /
"never").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from opt_jax.generation.config import GenerationConfig
from opt_jax.generation.decoding import _check_resolved
from opt_jax.generation.processors import ends_with, process_logits, warp_logits
from opt_jax.kv_cache import take_rows

# transformers marks impossible beams with this finite score.
LOW = -1.0e9


@struct.dataclass
class BeamState:
    """step: [] int32; running / finished: [B, K, L] token buffers; running_scores /
    finished_scores: [B, K] float32; is_finished: [B, K] bool; can_improve: [B, 1] bool;
    go_on: [] bool; logits: [N, V] next-token logits of the running beams; cache."""

    step: jax.Array
    running: jax.Array
    running_scores: jax.Array
    finished: jax.Array
    finished_scores: jax.Array
    is_finished: jax.Array
    can_improve: jax.Array
    go_on: jax.Array
    logits: jax.Array
    cache: object


def _gather(x, idx):
    """x [B, C, ...], idx [B, K] -> [B, K, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def beam_search(
    tokens_to_logits,
    gen_config: GenerationConfig,
    prompt,
    prompt_mask,
    cache,
    max_new_tokens,
    buffer_length: int,
    rng=None,
    values: dict | None = None,
):
    """Beam search (beam sampling when gen_config.do_sample) over a prompt repeated K times per row.

    Args:
      prompt, prompt_mask: [N, Tb] with each row's prompt repeated num_beams times.
      cache: empty cache for N rows and buffer_length slots.
      values: the traced options (see decoding.decode); None takes them from gen_config.

    Returns:
      (tokens [B, num_return_sequences, L], None, scores [B, num_return_sequences]).
    """
    _check_resolved(gen_config)
    values = gen_config.values() if values is None else values
    length_penalty = values["length_penalty"]
    k = gen_config.num_beams
    n, prompt_len = prompt.shape
    batch = n // k
    keep = max(2, 1 + len(gen_config.eos_token_id)) * k
    top_k_mask = jnp.arange(keep) < k  # only the best K candidates may finish
    length = buffer_length
    tokens = jnp.full((batch, k, length), gen_config.pad_token_id, jnp.int32)
    tokens = tokens.at[:, :, :prompt_len].set(prompt.reshape(batch, k, prompt_len))
    prompt_valid = jnp.zeros((batch, k, length), bool)
    prompt_valid = prompt_valid.at[:, :, :prompt_len].set(prompt_mask.reshape(batch, k, -1))
    generated = jnp.arange(length) >= prompt_len
    logits, _, cache = tokens_to_logits(prompt, prompt_mask, cache)
    rng = jax.random.key(0) if rng is None else rng

    state = BeamState(
        step=jnp.zeros((), jnp.int32),
        running=tokens,
        # All beams start identical: only the first may expand at step 0.
        running_scores=jnp.zeros((batch, k)).at[:, 1:].set(LOW),
        finished=tokens,
        finished_scores=jnp.full((batch, k), LOW),
        is_finished=jnp.zeros((batch, k), bool),
        can_improve=jnp.ones((batch, 1), bool),
        go_on=jnp.ones((), bool),
        logits=logits.astype(jnp.float32),
        cache=cache,
    )

    def body(s: BeamState):
        end = prompt_len + s.step  # the slot this step writes
        valid = prompt_valid | (generated & (jnp.arange(length) < end))[None, None, :]
        log_probs = jax.nn.log_softmax(s.logits, axis=-1)
        log_probs = process_logits(
            gen_config, values, log_probs, s.running.reshape(n, length),
            valid.reshape(n, length), end, s.step, generated,
        )  # fmt: skip
        if gen_config.do_sample:
            # As transformers: each warper keeps len(eos) + 1 tokens so a beam can go on.
            log_probs = warp_logits(gen_config, values, log_probs, gen_config.beam_min_keep)
        cand_scores, cand_beam, cand_token = _candidates(
            log_probs.reshape(batch, k, -1), s.running_scores, keep,
            jax.random.fold_in(rng, s.step) if gen_config.do_sample else None,
        )  # fmt: skip
        cand_seq = _gather(s.running, cand_beam)  # [B, C, L]
        cand_seq = jax.lax.dynamic_update_slice_in_dim(
            cand_seq, cand_token[:, :, None], end, axis=2
        )
        hits = _stops(gen_config, cand_token, cand_seq, end, s.step + 1 >= max_new_tokens)

        # The best K candidates that did not stop keep running.
        running_candidates = cand_scores + hits * LOW
        next_idx = jax.lax.top_k(running_candidates, k)[1]  # [B, K]
        running = _gather(cand_seq, next_idx)
        running_scores = _gather(running_candidates, next_idx)
        # Candidates among the top K that stopped compete for the finished list.
        finished, finished_scores, is_finished = _merge_finished(
            gen_config, s, cand_seq, cand_scores, hits & top_k_mask[None, :], length_penalty
        )

        # Reorder the cache so row b*K + j holds the history of running beam j of row b.
        origin = _gather(cand_beam, next_idx) + jnp.arange(batch)[:, None] * k
        cache = take_rows(s.cache, origin.reshape(n))
        new_tokens = jax.lax.dynamic_slice_in_dim(running, end, 1, axis=2).reshape(n, 1)
        logits, _, cache = tokens_to_logits(new_tokens, jnp.ones((n, 1), bool), cache)

        can_improve = s.can_improve & _can_improve(
            gen_config, s.step + 1, running_scores, finished_scores, is_finished,
            length_penalty, max_new_tokens,
        )  # fmt: skip
        go_on = can_improve.any() & ~hits.all()
        if gen_config.early_stopping is True:
            go_on &= ~is_finished.all()
        return BeamState(
            step=s.step + 1,
            running=running,
            running_scores=running_scores,
            finished=finished,
            finished_scores=finished_scores,
            is_finished=is_finished,
            can_improve=can_improve,
            go_on=go_on,
            logits=logits.astype(jnp.float32),
            cache=cache,
        )

    state = jax.lax.while_loop(lambda s: s.go_on, body, state)
    r = gen_config.num_return_sequences
    return state.finished[:, :r], None, state.finished_scores[:, :r]


def _candidates(log_probs, running_scores, keep: int, key=None):
    """The C = `keep` best continuations of a row's K beams over K x V.

    Args:
      log_probs: [B, K, V] processed next-token log-probabilities of each running beam.
      running_scores: [B, K] the beams' summed log-probabilities so far.
      key: beam sampling draws the C continuations without replacement (the Gumbel top-k
        trick) with this key; None takes the top C.

    Returns:
      (scores [B, C] sorted best first, beam [B, C] each comes from, token [B, C] int32)
    """
    batch, k, vocab = log_probs.shape
    scores = (log_probs + running_scores[:, :, None]).reshape(batch, k * vocab)
    if key is None:
        cand_scores, cand_idx = jax.lax.top_k(scores, keep)
    else:
        picked = jax.lax.top_k(scores + jax.random.gumbel(key, scores.shape), keep)[1]
        cand_scores = jnp.take_along_axis(scores, picked, axis=1)
        order = jnp.argsort(-cand_scores, axis=1)
        cand_scores = jnp.take_along_axis(cand_scores, order, axis=1)
        cand_idx = jnp.take_along_axis(picked, order, axis=1)
    return cand_scores, cand_idx // vocab, (cand_idx % vocab).astype(jnp.int32)


def _stops(gen_config, cand_token, cand_seq, end, at_limit):
    """[B, C] bool: candidates that stop here (EOS, a stop sequence ending at slot `end`, or
    the length limit `at_limit`)."""
    hits = jnp.isin(cand_token, jnp.asarray(gen_config.eos_token_id)) | at_limit
    if gen_config.stop_sequences:
        batch, keep, length = cand_seq.shape
        flat_seq = cand_seq.reshape(batch * keep, length)
        flat_valid = jnp.ones_like(flat_seq, bool)
        for seq in gen_config.stop_sequences:
            hits |= ends_with(flat_seq, flat_valid, end + 1, seq).reshape(batch, keep)
    return hits


def _merge_finished(gen_config, s: BeamState, cand_seq, cand_scores, just_finished,
                    length_penalty):  # fmt: skip
    """The per-row top-K finished hypotheses after this step's finished candidates join, scored
    sum / generated_length ** length_penalty as transformers scores them.

    Returns:
      (finished [B, K, L], finished_scores [B, K], is_finished [B, K])
    """
    final_scores = cand_scores / ((s.step + 1).astype(jnp.float32) ** length_penalty)
    if gen_config.early_stopping is True:  # a row with K finished takes no more
        final_scores += s.is_finished.all(-1, keepdims=True) * LOW
    final_scores += (~s.can_improve) * LOW
    final_scores += (~just_finished) * LOW
    merged_scores = jnp.concatenate([s.finished_scores, final_scores], axis=1)
    best = jax.lax.top_k(merged_scores, s.running.shape[1])[1]
    finished = _gather(jnp.concatenate([s.finished, cand_seq], axis=1), best)
    is_finished = _gather(jnp.concatenate([s.is_finished, just_finished], axis=1), best)
    return finished, _gather(merged_scores, best), is_finished


def _can_improve(gen_config, generated, running_scores, finished_scores, is_finished,
                 length_penalty, max_new_tokens):  # fmt: skip
    """[B, 1] bool, transformers' early-stop heuristic: can a row's best running beam still
    beat its worst finished hypothesis? (With early_stopping "never" and a positive length
    penalty the running beam is scored at the longest length it could reach.)"""
    generated_len = generated.astype(jnp.float32)
    best_len = generated_len
    if gen_config.early_stopping == "never":
        longest = jnp.asarray(max_new_tokens, jnp.float32)
        best_len = jnp.where(length_penalty > 0, longest, generated_len)
    best_running = running_scores[:, :1] / best_len**length_penalty
    worst_finished = jnp.where(is_finished, finished_scores.min(axis=1, keepdims=True), LOW)
    return (best_running > worst_finished).any(-1, keepdims=True)
