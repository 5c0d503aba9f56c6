"""Jit-compiled, KV-cached generation: greedy, sampling and contrastive search (beam search lives
in beam_search.py), with transformers' argument names.

Axis legend: B rows, Tb bucketed prompt length, M max new tokens, L = Tb + M buffer length,
V vocabulary, P hidden width, K contrastive candidates.

Shape of a call: one prefill forward over the left-padded prompt fills a preallocated KV cache,
then a `lax.while_loop` produces one token per iteration, all inside one `jax.jit`. The loop sees
the model only through `tokens_to_logits`:

    tokens_to_logits(tokens [B, T], mask [B, T], cache) -> (logits [B, V] of the last position,
                                                            hidden [B, T, P], cache)

so it is tested with fake models and exact expected tokens. Prompt length and M are bucketed
(multiples of BUCKET) and M is a traced value, so new prompt lengths rarely mean new compiles.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import io_callback

from opt_jax import logits_processing as lp
from opt_jax.kv_cache import KVCache
from opt_jax.model import OPTForCausalLM, OPTModel
from opt_jax.validation import validate_token_ids

# Prompt and new-token lengths are rounded up to multiples of this for static shapes.
BUCKET = 32


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding options (static: a new value means a new compilation). Names and defaults follow
    transformers' `generate`, including top_k=50 when sampling."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    suppress_tokens: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    penalty_alpha: float | None = None
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int = 1
    # Ban ids >= this (the embedding rows no tokenizer id maps to); None bans nothing.
    vocab_limit: int | None = None
    output_logprobs: bool = False

    @property
    def is_beam(self) -> bool:
        return self.num_beams > 1

    @property
    def is_contrastive(self) -> bool:
        # As transformers: contrastive search when penalty_alpha > 0 and top_k > 1, no sampling.
        return (
            not self.do_sample
            and not self.is_beam
            and bool(self.penalty_alpha)
            and (self.top_k or 0) > 1
        )


@struct.dataclass
class GenerateOutput:
    """sequences: [B * num_return_sequences, prompt_length + max_new_tokens] int32 (prompt as
    given, then new tokens, pad after EOS); logprobs: [same rows, max_new_tokens] float32 model
    log-probabilities of the chosen tokens (0 after EOS), when requested."""

    sequences: np.ndarray
    logprobs: np.ndarray | None = None
    # Beam search: final (length-penalised) score of each returned sequence.
    sequences_scores: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# Logits processing shared by every strategy
# ---------------------------------------------------------------------------------------------
def process_logits(cfg: GenerationConfig, scores, tokens, valid, end, num_generated, generated):
    """Applies the history-based processors, in transformers' order.

    Args:
      scores: [N, V] float32 (raw logits, or log-probs in beam search).
      tokens, valid: [N, L] token buffer and its real-token mask.
      end: traced scalar, slots written so far. num_generated: traced scalar.
      generated: [L] bool, which slots hold generated (not prompt) tokens.
    """
    vocab = scores.shape[-1]
    if cfg.repetition_penalty != 1.0:
        scores = lp.repetition_penalty(
            scores, lp.seen_mask(tokens, valid, vocab), cfg.repetition_penalty
        )
    if cfg.presence_penalty or cfg.frequency_penalty:
        counts = lp.token_counts(tokens, valid & generated[None, :], vocab)
        scores = lp.presence_frequency_penalty(
            scores, counts, cfg.presence_penalty, cfg.frequency_penalty
        )
    if cfg.no_repeat_ngram_size > 0:
        scores = lp.ban_repeated_ngrams(scores, tokens, valid, end, cfg.no_repeat_ngram_size)
    if cfg.bad_words_ids:
        scores = lp.ban_bad_words(scores, tokens, valid, end, cfg.bad_words_ids)
    if cfg.min_new_tokens > 0:
        scores = jnp.where(
            num_generated < cfg.min_new_tokens, lp.ban_tokens(scores, cfg.eos_token_id), scores
        )
    if cfg.suppress_tokens:
        scores = lp.ban_tokens(scores, cfg.suppress_tokens)
    if cfg.vocab_limit is not None and cfg.vocab_limit < vocab:
        scores = lp.ban_from(scores, cfg.vocab_limit)
    return scores


def warp_logits(cfg: GenerationConfig, scores, min_keep: int = 1):
    """Sampling warpers in transformers' order: temperature, top-k, top-p, min-p, typical.

    min_keep: tokens each filter must leave (transformers' min_tokens_to_keep: 1 when sampling,
    len(eos) + 1 in beam sampling so that a beam can continue past EOS).
    """
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k:
        scores = lp.top_k_filter(scores, cfg.top_k, min_keep)
    if cfg.top_p < 1.0:
        scores = lp.top_p_filter(scores, cfg.top_p, min_keep)
    if cfg.min_p:
        scores = lp.min_p_filter(scores, cfg.min_p, min_keep)
    if cfg.typical_p < 1.0:
        scores = lp.typical_filter(scores, cfg.typical_p, min_keep)
    return scores


def beam_min_keep(cfg: GenerationConfig) -> int:
    """transformers' min_tokens_to_keep for beam sampling: one more than the EOS ids (2 when
    there are none)."""
    return len(cfg.eos_token_id) + 1 if cfg.eos_token_id else 2


def stop_hit(cfg: GenerationConfig, tokens, valid, end, new_tokens):
    """[N] bool: the token just written is an EOS or completes a stop sequence."""
    hit = jnp.isin(new_tokens, jnp.asarray(cfg.eos_token_id, new_tokens.dtype))
    for sequence in cfg.stop_sequences:
        hit |= lp.ends_with(tokens, valid, end, sequence)
    return hit


def take_rows(cache, rows):
    """Gathers cache rows (repeat, reorder or select beams / candidates)."""
    if isinstance(cache, KVCache):
        if isinstance(cache.key, tuple):
            key, value = tuple(k[rows] for k in cache.key), tuple(v[rows] for v in cache.value)
        else:  # stacked [L, B, ...] (scan_layers)
            key, value = cache.key[:, rows], cache.value[:, rows]
        return KVCache(
            key=key,
            value=value,
            slot_mask=cache.slot_mask[rows],
            index=cache.index[rows],
            position=cache.position[rows],
        )
    return jax.tree.map(lambda x: x[rows], cache)  # batch-major pytrees (fake models)


# ---------------------------------------------------------------------------------------------
# The loop: greedy, sampling, contrastive search
# ---------------------------------------------------------------------------------------------
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


def _contrastive_choice(cfg, tokens_to_logits, state, scores, end):
    """One contrastive-search step (Su et al. 2022): among the top-k tokens, pick the one
    maximising (1 - alpha) * p(v) - alpha * max cos(h_v, h_context)."""
    k = cfg.top_k
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
    score = (1.0 - cfg.penalty_alpha) * top_probs - cfg.penalty_alpha * degeneration
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
    cfg: GenerationConfig,
    prompt: jax.Array,
    prompt_mask: jax.Array,
    cache,
    rng: jax.Array,
    max_new_tokens,
    buffer_length: int,
    stream: Callable | None = None,
    stream_id: jax.Array | None = None,
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

    Returns:
      (tokens [B, L], logprobs [B, L - Tb]).
    """
    batch, prompt_len = prompt.shape
    pad = cfg.pad_token_id
    tokens = jnp.full((batch, buffer_length), pad, jnp.int32).at[:, :prompt_len].set(prompt)
    valid = jnp.zeros((batch, buffer_length), bool).at[:, :prompt_len].set(prompt_mask)
    generated = jnp.arange(buffer_length) >= prompt_len

    logits, hidden, cache = tokens_to_logits(prompt, prompt_mask, cache)  # prefill
    context = None
    if cfg.is_contrastive:
        context = jnp.zeros((batch, buffer_length, hidden.shape[-1]), hidden.dtype)
        context = context.at[:, :prompt_len].set(hidden)
    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        tokens=tokens,
        valid=valid,
        done=jnp.zeros((batch,), bool),
        logits=logits.astype(jnp.float32),
        cache=cache,
        logprobs=jnp.zeros((batch, buffer_length - prompt_len), jnp.float32),
        context=context,
    )

    def cond(s: DecodeState):
        return (s.step < max_new_tokens) & ~s.done.all()

    def body(s: DecodeState):
        end = prompt_len + s.step  # the slot this step writes
        scores = process_logits(cfg, s.logits, s.tokens, s.valid, end, s.step, generated)
        next_logits = cache = context = None
        if cfg.is_contrastive:
            token, next_logits, cache, context = _contrastive_choice(
                cfg, tokens_to_logits, s, scores, end
            )
        elif cfg.do_sample:
            key = jax.random.fold_in(rng, s.step)
            token = jax.random.categorical(key, warp_logits(cfg, scores), axis=-1)
        else:
            token = jnp.argmax(scores, axis=-1)
        token = jnp.where(s.done, pad, token).astype(jnp.int32)  # finished rows emit padding
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], end, axis=1)
        valid = jax.lax.dynamic_update_slice_in_dim(s.valid, ~s.done[:, None], end, axis=1)
        logprobs = s.logprobs
        if cfg.output_logprobs:
            chosen = jnp.take_along_axis(jax.nn.log_softmax(s.logits), token[:, None], axis=1)
            logprobs = logprobs.at[:, s.step].set(jnp.where(s.done, 0.0, chosen[:, 0]))
        done = s.done | stop_hit(cfg, tokens, valid, end + 1, token)
        if stream is not None and stream_id is not None:
            keep = io_callback(
                stream, jax.ShapeDtypeStruct((), jnp.bool_), stream_id, s.step, token, ordered=True
            )
            done = done | ~keep
        elif stream is not None:
            io_callback(stream, None, s.step, token, ordered=True)
        if not cfg.is_contrastive:
            next_logits, _, cache = tokens_to_logits(
                token[:, None], jnp.ones((batch, 1), bool), s.cache
            )
        return DecodeState(
            step=s.step + 1,
            tokens=tokens,
            valid=valid,
            done=done,
            logits=next_logits.astype(jnp.float32),
            cache=cache,
            logprobs=logprobs,
            context=context,
        )

    state = jax.lax.while_loop(cond, body, state)
    return state.tokens, state.logprobs


# ---------------------------------------------------------------------------------------------
# The OPT adapter and the public entry point
# ---------------------------------------------------------------------------------------------
def opt_tokens_to_logits(config, params, head=None):
    """tokens_to_logits for an OPTForCausalLM: runs the decoder with the cache and computes the
    tied-head logits for the last position only (the prefill needs no others).

    head: optional [P, V] copy of the embedding (see lm_head_copy) used for the LM head matmul.
    """
    decoder = OPTModel(config)

    def tokens_to_logits(tokens, mask, cache):
        out = decoder.apply({"params": params["model"]}, tokens, mask, cache=cache)
        hidden = out.last_hidden_state  # [B, T, P]
        last = hidden[:, -1].astype(config.compute_dtype)
        if head is None:
            embedding = params["model"]["decoder"]["embed_tokens"]["embedding"]
            logits = jnp.einsum("bp,vp->bv", last, embedding.astype(config.compute_dtype))
        else:
            logits = jnp.einsum("bp,pv->bv", last, head.astype(config.compute_dtype))
        return logits.astype(jnp.float32), hidden, out.cache

    return tokens_to_logits


# On CPU, XLA's matmul with a few rows on the left streams a [P, V] right-hand side much faster
# than the [V, P] embedding table itself (125m, batch 8: 5.9 -> 4.0 ms per decode step for the
# LM head; experiments/perf/README.md). So CPU decoding uses a transposed copy, made once per
# embedding array and kept while that array lives. Accelerators take either layout at full
# speed, and sharded tables are left alone.
_HEAD_COPIES: dict[int, jax.Array] = {}  # id(embedding array) -> its [P, V] copy
_HEAD_LOCK = threading.Lock()
_transposed = jax.jit(lambda table: table.T)


def lm_head_copy(params) -> jax.Array | None:
    """The [P, V] LM-head copy to decode with, or None (use the embedding as it is)."""
    table = params["model"]["decoder"]["embed_tokens"]["embedding"]
    if not isinstance(table, jax.Array) or len(table.sharding.device_set) != 1:
        return None
    if next(iter(table.sharding.device_set)).platform != "cpu":
        return None
    key = id(table)
    with _HEAD_LOCK:
        head = _HEAD_COPIES.get(key)
        if head is None:
            head = _HEAD_COPIES[key] = _transposed(table)
            # Dropped the moment the table is collected (before its id can be reused).
            weakref.finalize(table, _HEAD_COPIES.pop, key, None)
    return head


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


# Counts traces of the jitted generation functions (the compile-once test reads it).
TRACE_COUNT = {"n": 0}
_JIT_CACHE: dict = {}


# The streamers of the calls in flight, by call id. Compiled code calls `_stream_dispatch` with
# the id as a traced operand, so a new streamer never means a new compilation, and concurrent
# calls (threads, an abandoned stream_text) each reach only their own streamer.
_STREAMERS: dict[int, Callable] = {}
_STREAMERS_LOCK = threading.Lock()
_STREAM_IDS = itertools.count(1)


def _register_streamer(streamer: Callable) -> int:
    with _STREAMERS_LOCK:
        stream_id = next(_STREAM_IDS) % (2**31 - 1)  # fits the int32 operand
        _STREAMERS[stream_id] = streamer
    return stream_id


def _unregister_streamer(stream_id: int) -> None:
    with _STREAMERS_LOCK:
        _STREAMERS.pop(stream_id, None)


def _stream_dispatch(stream_id, step, tokens):
    """Forwards one step's tokens to the streamer of call `stream_id`. Returns False (stop
    decoding) when that call has no streamer any more or the streamer returned False."""
    with _STREAMERS_LOCK:
        streamer = _STREAMERS.get(int(stream_id))
    if streamer is None:
        return np.bool_(False)
    return np.bool_(streamer(int(step), np.asarray(tokens)) is not False)


def _compiled(config, cfg: GenerationConfig, streaming: bool):
    key = (config, cfg, streaming)
    if key not in _JIT_CACHE:

        def run(params, head, prompt, mask, rng, max_new, stream_id, buffer_length):
            TRACE_COUNT["n"] += 1
            tokens_to_logits = opt_tokens_to_logits(config, params, head)
            cache = KVCache.init(config, prompt.shape[0], buffer_length)
            if cfg.is_beam:
                from opt_jax.beam_search import beam_search

                return beam_search(
                    tokens_to_logits, cfg, prompt, mask, cache, max_new, buffer_length, rng
                )
            stream = _stream_dispatch if streaming else None
            tokens, logprobs = decode(
                tokens_to_logits,
                cfg,
                prompt,
                mask,
                cache,
                rng,
                max_new,
                buffer_length,
                stream,
                stream_id if streaming else None,
            )
            return tokens, logprobs, None

        _JIT_CACHE[key] = jax.jit(run, static_argnums=(7,))
    return _JIT_CACHE[key]


def _integer(name: str, value, *, allow_none: bool = False):
    """value as a Python int; numpy integers are accepted, floats and bools are not."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_options(cfg: GenerationConfig, max_new_tokens: int, vocab_size: int) -> None:
    if (
        isinstance(max_new_tokens, (bool, np.bool_))
        or not isinstance(max_new_tokens, (int, np.integer))
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if cfg.num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {cfg.num_beams}")
    if cfg.num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {cfg.num_return_sequences}")
    if cfg.is_beam and cfg.num_return_sequences > cfg.num_beams:
        raise ValueError(
            f"num_return_sequences ({cfg.num_return_sequences}) must be <= num_beams "
            f"({cfg.num_beams}) in beam search"
        )
    if not cfg.is_beam and not cfg.do_sample and cfg.num_return_sequences > 1:
        raise ValueError(
            "num_return_sequences > 1 needs do_sample=True or beam search: greedy decoding "
            "would return identical copies"
        )
    if cfg.is_beam and cfg.output_logprobs:
        raise ValueError(
            "output_logprobs=True is not available with num_beams > 1 (beam search returns "
            "sequences_scores instead)"
        )
    if cfg.do_sample and not cfg.temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {cfg.temperature}")
    for name in ("top_p", "typical_p"):
        value = getattr(cfg, name)
        if not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    if cfg.min_p is not None and not 0 <= cfg.min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {cfg.min_p}")
    if cfg.top_k is not None and cfg.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {cfg.top_k}")
    if cfg.penalty_alpha is not None and not 0 <= cfg.penalty_alpha <= 1:
        raise ValueError(f"penalty_alpha must be in [0, 1], got {cfg.penalty_alpha}")
    if cfg.penalty_alpha:  # > 0: contrastive search
        if cfg.do_sample or cfg.is_beam:
            raise ValueError(
                "penalty_alpha selects contrastive search, which is greedy: it cannot be "
                f"combined with do_sample=True or num_beams > 1 (got do_sample={cfg.do_sample}, "
                f"num_beams={cfg.num_beams})"
            )
        if (cfg.top_k or 0) < 2:
            raise ValueError(
                f"penalty_alpha (contrastive search) needs top_k >= 2 candidates, got "
                f"top_k={cfg.top_k!r}"
            )
        if cfg.top_k > vocab_size:
            raise ValueError(
                f"top_k ({cfg.top_k}) must be <= the vocabulary size ({vocab_size}) in "
                "contrastive search"
            )
    if cfg.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {cfg.repetition_penalty}")
    if cfg.no_repeat_ngram_size < 0 or cfg.min_new_tokens < 0:
        raise ValueError("no_repeat_ngram_size and min_new_tokens must be >= 0")
    if cfg.min_new_tokens > max_new_tokens:
        raise ValueError(
            f"min_new_tokens ({cfg.min_new_tokens}) must be <= max_new_tokens ({max_new_tokens})"
        )
    if cfg.early_stopping not in (True, False, "never"):
        raise ValueError(
            f"early_stopping must be True, False or 'never', got {cfg.early_stopping!r}"
        )
    ids = [cfg.pad_token_id, *cfg.eos_token_id, *cfg.suppress_tokens]
    ids += [t for seq in cfg.bad_words_ids + cfg.stop_sequences for t in seq]
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad} in the generation options are outside [0, {vocab_size})")
    if any(len(seq) == 0 for seq in cfg.bad_words_ids + cfg.stop_sequences):
        raise ValueError("bad_words_ids and stop_sequences must not contain empty sequences")
    if cfg.vocab_limit is not None:
        special = max([cfg.pad_token_id, *cfg.eos_token_id])
        if not cfg.vocab_limit > max(special, 0):
            raise ValueError(
                f"vocab_limit must be > 0 and > the EOS and pad ids (largest {special}): it bans "
                f"every id >= it, got {cfg.vocab_limit}"
            )


def _as_tuples(name: str, sequences) -> tuple[tuple[int, ...], ...]:
    """A list of token-id lists as tuples; a flat list of ids is an error."""
    out = []
    for seq in sequences if sequences is not None else ():
        if isinstance(seq, (str, bytes)) or np.ndim(seq) != 1:
            raise ValueError(f"{name} expects a list of token-id lists, got {sequences!r}")
        out.append(tuple(_integer(f"{name} token id", t) for t in seq))
    return tuple(out)


def generate(
    model,
    params,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float = 1.0,
    min_p: float | None = None,
    typical_p: float = 1.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0,
    bad_words_ids: Sequence[Sequence[int]] | None = None,
    suppress_tokens: Sequence[int] | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    penalty_alpha: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    vocab_limit: int | None = None,
    output_logprobs: bool = False,
    seed: int | None = None,
    prng_key: jax.Array | None = None,
    streamer: Callable[[int, np.ndarray], None] | None = None,
) -> GenerateOutput:
    """Generates continuations of left-padded prompts with an OPTForCausalLM.

    Args:
      model: an `OPTForCausalLM` (its config is read; params are passed separately).
      params: its parameters.
      input_ids: [B, T] int prompt ids, left-padded (as OPTTokenizer.encode_batch returns).
      attention_mask: [B, T], 1 for real tokens; None means no padding.
      max_new_tokens: tokens to generate per row; prompt length + this must fit
        max_position_embeddings.
      The other options carry transformers' names and meanings (see GenerationConfig);
      stop_sequences are token-id sequences that end a row like EOS; vocab_limit bans ids >= it
      (pass the tokenizer's vocab_size to mask OPT's padded embedding rows); seed or prng_key
      fix sampling; streamer(step, tokens [B * num_return_sequences]) receives tokens as they
      are produced (greedy / sampling / contrastive), only this call's, even with concurrent
      calls; if it returns False, generation stops there (the rest of every row is padding).
      A single-token bad word equal to an EOS id is ignored, as in transformers.
      eos_token_id None means the config's EOS (2 for OPT); pass [] to never stop early.

    Returns:
      GenerateOutput with sequences [B * num_return_sequences, T + max_new_tokens] int32.

    Raises:
      ValueError: bad options or inputs, before anything is traced or compiled.
    """
    config = model.config
    if not isinstance(model, OPTForCausalLM):
        raise ValueError(f"generate needs an OPTForCausalLM, got {type(model).__name__}")
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos = (int(eos),) if np.isscalar(eos) else tuple(int(e) for e in eos)
    # As transformers' NoBadWordsLogitsProcessor: a single-token bad word equal to an EOS id is
    # dropped, so EOS stays allowed.
    bad_words = tuple(
        seq for seq in _as_tuples("bad_words_ids", bad_words_ids) if seq not in {(e,) for e in eos}
    )
    cfg = GenerationConfig(
        do_sample=do_sample,
        temperature=float(temperature),
        top_k=_integer("top_k", top_k, allow_none=True),
        top_p=float(top_p),
        min_p=min_p,
        typical_p=float(typical_p),
        repetition_penalty=float(repetition_penalty),
        presence_penalty=float(presence_penalty),
        frequency_penalty=float(frequency_penalty),
        no_repeat_ngram_size=_integer("no_repeat_ngram_size", no_repeat_ngram_size),
        min_new_tokens=_integer("min_new_tokens", min_new_tokens),
        bad_words_ids=bad_words,
        suppress_tokens=tuple(int(t) for t in (suppress_tokens or ())),
        stop_sequences=_as_tuples("stop_sequences", stop_sequences),
        num_beams=_integer("num_beams", num_beams),
        length_penalty=float(length_penalty),
        early_stopping=early_stopping,
        num_return_sequences=_integer("num_return_sequences", num_return_sequences),
        penalty_alpha=penalty_alpha,
        eos_token_id=eos,
        pad_token_id=int(config.pad_token_id if pad_token_id is None else pad_token_id),
        vocab_limit=_integer("vocab_limit", vocab_limit, allow_none=True),
        output_logprobs=output_logprobs,
    )
    _check_options(cfg, max_new_tokens, config.vocab_size)
    max_new_tokens = int(max_new_tokens)
    ids = validate_token_ids(input_ids, config.vocab_size, attention_mask=attention_mask)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    mask = mask.astype(bool)
    batch, prompt_len = ids.shape
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"prompt rows {empty.tolist()} are empty (no real token in the mask)")
    if not mask[:, -1].all():
        raise ValueError(
            "prompts must be left-padded (every row's last token real): rows "
            f"{np.flatnonzero(~mask[:, -1]).tolist()} end in padding"
        )
    total = prompt_len + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"max_position_embeddings {config.max_position_embeddings}"
        )
    if streamer is not None and cfg.is_beam:
        raise ValueError("streaming is not available for beam search (beams are reordered)")

    # Static shapes: bucket the prompt (extra left padding is harmless: positions come from the
    # mask) and the buffer, capped so that every slot has a position embedding.
    limit = config.max_position_embeddings
    bucket_prompt = min(_round_up(prompt_len, BUCKET), limit - max_new_tokens)
    buffer_length = min(bucket_prompt + _round_up(max_new_tokens, BUCKET), limit)
    extra = bucket_prompt - prompt_len
    ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=cfg.pad_token_id)
    mask = np.pad(mask, ((0, 0), (extra, 0)))
    copies = cfg.num_beams if cfg.is_beam else cfg.num_return_sequences
    ids, mask = np.repeat(ids, copies, axis=0), np.repeat(mask, copies, axis=0)
    if prng_key is None:
        prng_key = jax.random.key(0 if seed is None else seed)

    fn = _compiled(config, cfg, streamer is not None)
    stream_id = 0 if streamer is None else _register_streamer(streamer)
    try:
        tokens, logprobs, scores = fn(
            params,
            lm_head_copy(params),
            jnp.asarray(ids),
            jnp.asarray(mask),
            prng_key,
            max_new_tokens,
            jnp.asarray(stream_id, jnp.int32),
            buffer_length,
        )
        tokens = np.asarray(tokens)  # waits for the device, and so for every streamed token
    finally:
        if streamer is not None:
            _unregister_streamer(stream_id)
    if cfg.is_beam:  # beam_search returns [B, num_return_sequences, L]
        tokens = tokens.reshape(batch * cfg.num_return_sequences, -1)
    sequences = tokens[:, extra : bucket_prompt + max_new_tokens]
    return GenerateOutput(
        sequences=sequences.astype(np.int32),
        logprobs=np.asarray(logprobs)[:, :max_new_tokens] if output_logprobs else None,
        sequences_scores=None if scores is None else np.asarray(scores).reshape(-1),
    )
