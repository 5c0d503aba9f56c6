"""The decode loop for greedy, sampling and contrastive search (beam search is beam_search.py).

Axis legend: B rows, Tb bucketed prompt length, M max new tokens, L = Tb + M buffer length,
V vocabulary, P hidden width, K contrastive candidates.

One prefill forward over the left-padded prompt fills a preallocated cache, then a
`lax.while_loop` produces one token per iteration. The loop sees the model only through

    tokens_to_logits(tokens [B, T], mask [B, T], cache) -> (logits [B, V] of the last position,
                                                            hidden [B, T, P], cache)

so it is tested with fake models and exact expected tokens (tests/test_decoding_fake.py).
`generate` (api.py) wires it to OPT, buckets shapes and compiles it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental import io_callback

from opt_jax.generation.config import GenerationConfig
from opt_jax.generation.processors import process_logits, stop_hit, warp_logits
from opt_jax.kv_cache import take_rows


def _check_resolved(gen_config: GenerationConfig) -> None:
    if gen_config.eos_token_id is None or gen_config.pad_token_id is None:
        raise ValueError(
            "the GenerationConfig has no eos_token_id / pad_token_id: set them, or take the "
            "model's with gen_config.for_model(model_config)"
        )


@struct.dataclass
class DecodeState:
    """Loop carry.

    step: [] int32 new tokens produced; tokens: [B, L] int32; valid: [B, L] bool real tokens;
    done: [B] bool; logits: [B, V] float32 next-token logits; cache: the model cache;
    logprobs: [B, M] float32; context: [B, L, P] hidden states (contrastive) or None.
    """

    step: jax.Array
    tokens: jax.Array
    valid: jax.Array
    done: jax.Array
    logits: jax.Array
    cache: Any
    logprobs: jax.Array
    context: Any = None


def _contrastive_choice(gen_config, alpha, tokens_to_logits, state, scores, end):
    """One contrastive-search step (Su et al. 2022): among the top-k tokens, pick the one
    maximising (1 - alpha) * p(v) - alpha * max cos(h_v, h_context)."""
    k = gen_config.top_k
    batch = scores.shape[0]
    probs = jax.nn.softmax(scores, axis=-1)
    top_probs, top_ids = jax.lax.top_k(probs, k)  # [B, K]
    rows = jnp.repeat(jnp.arange(batch), k)  # candidate b*K + j belongs to row b
    cand_cache = take_rows(state.cache, rows)
    cand_logits, cand_hidden, cand_cache = tokens_to_logits(
        top_ids.reshape(-1, 1), jnp.ones((batch * k, 1), bool), cand_cache
    )
    cand_hidden = cand_hidden[:, -1].reshape(batch, k, -1).astype(jnp.float32)  # [B, K, P]
    context = state.context.astype(jnp.float32)  # [B, L, P]

    def unit(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    cosine = jnp.einsum("bkp,blp->bkl", unit(cand_hidden), unit(context))
    cosine = jnp.where(state.valid[:, None, :], cosine, -jnp.inf)  # only real context tokens
    degeneration = cosine.max(-1)  # [B, K]
    score = (1.0 - alpha) * top_probs - alpha * degeneration
    best = jnp.argmax(score, axis=-1)  # [B]
    chosen = jnp.arange(batch) * k + best
    token = jnp.take_along_axis(top_ids, best[:, None], axis=1)[:, 0]
    hidden = cand_hidden[jnp.arange(batch), best]  # [B, P]
    context = jax.lax.dynamic_update_slice_in_dim(
        state.context, hidden[:, None].astype(state.context.dtype), end, axis=1
    )
    return token, cand_logits[chosen], take_rows(cand_cache, chosen), context


def decode(
    tokens_to_logits: Callable,
    gen_config: GenerationConfig,
    prompt: jax.Array,
    prompt_mask: jax.Array,
    cache,
    rng: jax.Array,
    max_new_tokens,
    buffer_length: int,
    stream: Callable | None = None,
    stream_id: jax.Array | None = None,
    values: dict | None = None,
):
    """Greedy / sampling / contrastive decoding (pure; jit it).

    Args:
      tokens_to_logits: the model, see the module docstring.
      prompt, prompt_mask: [B, Tb] left-padded prompt and its mask (every row has a real token).
      cache: an empty cache with room for buffer_length tokens per row.
      rng: PRNG key; step t samples with fold_in(rng, t).
      max_new_tokens: scalar (may be traced), at most buffer_length - Tb.
      buffer_length: static L.
      stream: optional host callback(step, tokens [B]) called as tokens are produced.
      stream_id: optional traced int32 scalar. When given, the callback is called as
        stream(stream_id, step, tokens) and must return a bool: False ends the loop (every row
        is marked done), e.g. because nobody listens to that stream any more.
      values: the traced options (`GenerationConfig.values()`, as scalars or jax arrays);
        None takes them from gen_config, which must then be a full config rather than a program.

    Returns:
      (tokens [B, L], logprobs [B, L - Tb]).
    """
    _check_resolved(gen_config)
    values = gen_config.values() if values is None else values
    batch, prompt_len = prompt.shape
    logits, hidden, cache = tokens_to_logits(prompt, prompt_mask, cache)  # prefill
    state = start(gen_config, prompt, prompt_mask, logits, cache, buffer_length, hidden)
    generated = jnp.arange(buffer_length) >= prompt_len

    def cond(s: DecodeState):
        return (s.step < max_new_tokens) & ~s.done.all()

    def body(s: DecodeState):
        end = prompt_len + s.step  # the slot this step writes
        next_logits = cache = context = None
        if gen_config.is_contrastive:
            scores = process_logits(
                gen_config, values, s.logits, s.tokens, s.valid, end, s.step, generated
            )
            token, next_logits, cache, context = _contrastive_choice(
                gen_config, values["penalty_alpha"], tokens_to_logits, s, scores, end
            )
            token = jnp.where(s.done, gen_config.pad_token_id, token).astype(jnp.int32)
        else:
            token = choose(gen_config, values, s, rng, end, generated)
        s = record(gen_config, s, token, end)
        done = s.done
        if stream is not None and stream_id is not None:
            # Unordered: its result feeds the loop's condition, which orders the calls anyway,
            # and jax 0.10.2 cannot lower an ordered callback beside arguments in host memory
            # (OPTConfig.layer_memory="pinned_host": "safe_zip() argument 1 has length 3").
            keep = io_callback(
                stream, jax.ShapeDtypeStruct((), jnp.bool_), stream_id, s.step - 1, token,
                ordered=False,
            )  # fmt: skip
            done = done | ~keep
        elif stream is not None:
            io_callback(stream, None, s.step - 1, token, ordered=True)
        if not gen_config.is_contrastive:
            next_logits, _, cache = tokens_to_logits(
                token[:, None], jnp.ones((batch, 1), bool), s.cache
            )
        return s.replace(
            done=done,
            logits=next_logits.astype(jnp.float32),
            cache=cache,
            context=s.context if context is None else context,
        )

    state = jax.lax.while_loop(cond, body, state)
    return state.tokens, state.logprobs


# The pieces of one decoding step, shared with the host-driven loop of layer-streamed generation
# (generation/streamed.py), which calls the model between them.
def start(gen_config, prompt, prompt_mask, logits, cache, buffer_length: int, hidden=None):
    """The loop's first state after the prefill: the prompt in a [B, L] buffer, its logits.

    hidden: the prefill's [B, Tb, P] hidden states (contrastive search keeps them as context).
    """
    batch, prompt_len = prompt.shape
    pad = gen_config.pad_token_id
    tokens = jnp.full((batch, buffer_length), pad, jnp.int32).at[:, :prompt_len].set(prompt)
    valid = jnp.zeros((batch, buffer_length), bool).at[:, :prompt_len].set(prompt_mask)
    context = None
    if gen_config.is_contrastive:
        context = jnp.zeros((batch, buffer_length, hidden.shape[-1]), hidden.dtype)
        context = context.at[:, :prompt_len].set(hidden)
    return DecodeState(
        step=jnp.zeros((), jnp.int32),
        tokens=tokens,
        valid=valid,
        done=jnp.zeros((batch,), bool),
        logits=logits.astype(jnp.float32),
        cache=cache,
        logprobs=jnp.zeros((batch, buffer_length - prompt_len), jnp.float32),
        context=context,
    )


def choose(gen_config, values, s: DecodeState, rng, end, generated) -> jax.Array:
    """The next token of every row [B] int32 (greedy or sampled; padding for finished rows)
    from s.logits after the processors; step t samples with fold_in(rng, t)."""
    scores = process_logits(gen_config, values, s.logits, s.tokens, s.valid, end, s.step, generated)
    if gen_config.do_sample:
        key = jax.random.fold_in(rng, s.step)
        token = jax.random.categorical(key, warp_logits(gen_config, values, scores), axis=-1)
    else:
        token = jnp.argmax(scores, axis=-1)
    return jnp.where(s.done, gen_config.pad_token_id, token).astype(jnp.int32)


def record(gen_config, s: DecodeState, token, end) -> DecodeState:
    """Writes `token` [B] at slot `end`: tokens, validity, log-probabilities (of s.logits), which
    rows are done, step + 1. The logits and cache are left for the caller to advance."""
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], end, axis=1)
    valid = jax.lax.dynamic_update_slice_in_dim(s.valid, ~s.done[:, None], end, axis=1)
    logprobs = s.logprobs
    if gen_config.output_logprobs:
        chosen = jnp.take_along_axis(jax.nn.log_softmax(s.logits), token[:, None], axis=1)
        logprobs = logprobs.at[:, s.step].set(jnp.where(s.done, 0.0, chosen[:, 0]))
    done = s.done | stop_hit(gen_config, tokens, valid, end + 1, token)
    return s.replace(step=s.step + 1, tokens=tokens, valid=valid, done=done, logprobs=logprobs)
