"""generate(): OPT wired to the decode loops, with host-side checks, shape buckets and a bounded
cache of compiled programs.

A call: check the options (GenerationConfig) and the prompt on the host, pad the prompt and the
buffer to bucketed lengths, then run one jitted program (prefill + `lax.while_loop`) that takes
the traced option values as arguments. So new prompt lengths rarely, and new temperatures or
top_p values never, mean a new compilation.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from opt_jax.generation.beam_search import beam_search
from opt_jax.generation.config import GenerationConfig
from opt_jax.generation.decoding import decode
from opt_jax.generation.prompts import GenerateOutput, bucketed, check_prompt
from opt_jax.generation.speculative import speculative_decode
from opt_jax.generation.streamed import LayerSource, streamed_generate
from opt_jax.kv_cache import KVCache
from opt_jax.model import OPTForCausalLM, OPTModel
from opt_jax.param_tree import tied_embedding
from opt_jax.shapes import ProgramCache, round_up

# Compiled generation programs kept (least recently used dropped first). Each one is a
# (model config, static options, streaming) triple holding its executables for the shapes
# it has seen; a notebook sweeping traced values (temperature, top_p, ...) reuses one entry.
COMPILE_CACHE_SIZE = 16


def generate(
    model,
    params,
    input_ids,
    attention_mask=None,
    *,
    generation_config: GenerationConfig | None = None,
    seed: int | None = None,
    prng_key: jax.Array | None = None,
    streamer: Callable[[int, np.ndarray], bool | None] | None = None,
    assistant_model=None,
    assistant_params=None,
    **options,
) -> GenerateOutput:
    """Generates continuations of left-padded prompts with an OPTForCausalLM.

    Args:
      model: an `OPTForCausalLM` (its config is read; params are passed separately).
      params: its parameters (plain or as flax's `model.init` returns them, boxed).
      input_ids: [B, T] int prompt ids, left-padded (as OPTTokenizer.encode_batch returns).
      attention_mask: [B, T], 1 for real tokens; None means no padding.
      generation_config: a GenerationConfig; `options` (any of its fields by name, e.g.
        `max_new_tokens=20, do_sample=True, top_p=0.9`) override it. `max_new_tokens` is
        required; prompt length + max_new_tokens must fit max_position_embeddings.
      seed, prng_key: fix sampling (default: seed 0).
      streamer: callback(step, tokens [B * num_return_sequences]) receiving tokens as they are
        produced (greedy / sampling / contrastive), only this call's, even with concurrent
        calls; returning False stops generation there (the rest of every row is padding).
      assistant_model, assistant_params: a smaller OPTForCausalLM with the same vocabulary that
        drafts `num_assistant_tokens` tokens per step for this model to verify (speculative
        decoding, generation/speculative.py): greedy output equals this model's greedy output,
        sampled output follows its distribution. `prompt_lookup_num_tokens=K` drafts from
        n-grams of the text instead, with no assistant.

    Returns:
      GenerateOutput with sequences [B * num_return_sequences, T + max_new_tokens] int32.

    Raises:
      ValueError: bad options or inputs, before anything is traced or compiled.
    """
    if not isinstance(model, OPTForCausalLM):
        raise ValueError(f"generate needs an OPTForCausalLM, got {type(model).__name__}")
    config = model.config
    gen_config = (generation_config or GenerationConfig()).replace(**options).for_model(config)
    if gen_config.max_new_tokens is None:
        raise ValueError("max_new_tokens is required (pass max_new_tokens=N)")
    if streamer is not None and gen_config.is_beam:
        raise ValueError("streaming is not available for beam search (beams are reordered)")
    speculative = assistant_model is not None or gen_config.prompt_lookup_num_tokens is not None
    if isinstance(params, LayerSource):  # weights that stream (load_pretrained(offload="disk"))
        if speculative:
            raise ValueError("speculative decoding does not take offloaded params yet")
        prng_key = jax.random.key(0 if seed is None else seed) if prng_key is None else prng_key
        return streamed_generate(config, params, input_ids, attention_mask, gen_config, prng_key,
                                 streamer)  # fmt: skip
    if speculative:
        return _speculative(model, params, input_ids, attention_mask, gen_config, seed,
                            prng_key, streamer, assistant_model, assistant_params)  # fmt: skip
    if gen_config.output_acceptance:
        raise ValueError("output_acceptance needs speculative decoding (assistant_model= or "
                         "prompt_lookup_num_tokens=)")  # fmt: skip
    ids, mask = check_prompt(input_ids, attention_mask, config, gen_config.max_new_tokens)

    batch = ids.shape[0]
    copies = gen_config.num_beams if gen_config.is_beam else gen_config.num_return_sequences
    ids, mask, bucket_prompt, buffer_length, extra = bucketed(
        ids, mask, gen_config, gen_config.max_new_tokens, config.max_position_embeddings, copies
    )
    prng_key = jax.random.key(0 if seed is None else seed) if prng_key is None else prng_key

    params = nn.unbox(params)
    program = _compiled(config, gen_config.program(), streamer is not None)
    values = {name: jnp.float32(v) for name, v in gen_config.values().items()}
    stream_id = 0 if streamer is None else _register_streamer(streamer)
    try:
        tokens, logprobs, scores = program(
            params, lm_head_copy(params), jnp.asarray(ids), jnp.asarray(mask), prng_key,
            values, gen_config.max_new_tokens, jnp.int32(stream_id), buffer_length,
        )  # fmt: skip
        tokens = np.asarray(tokens)  # waits for the device, and so for every streamed token
    finally:
        if streamer is not None:
            _unregister_streamer(stream_id)
    if gen_config.is_beam:  # beam_search returns [B, num_return_sequences, L]
        tokens = tokens.reshape(batch * gen_config.num_return_sequences, -1)
    return GenerateOutput(
        sequences=tokens[:, extra : bucket_prompt + gen_config.max_new_tokens].astype(np.int32),
        logprobs=np.asarray(logprobs)[:, : gen_config.max_new_tokens]
        if gen_config.output_logprobs
        else None,
        sequences_scores=None if scores is None else np.asarray(scores).reshape(-1),
    )


# ---------------------------------------------------------------------------------------------
# Speculative decoding
# ---------------------------------------------------------------------------------------------


def _check_speculative(config, gen_config, assistant_model, assistant_params):
    """One-line errors for a speculative request, before anything is traced."""
    lookup = gen_config.prompt_lookup_num_tokens is not None
    if lookup and assistant_model is not None:
        raise ValueError("pass assistant_model= or prompt_lookup_num_tokens=, not both")
    if gen_config.is_beam or gen_config.is_contrastive:
        raise ValueError(
            "speculative decoding (assistant_model / prompt_lookup_num_tokens) works with greedy "
            "decoding and sampling, not with beam search or contrastive search"
        )
    if assistant_model is None:
        return None
    if not isinstance(assistant_model, OPTForCausalLM):
        raise ValueError(
            f"assistant_model must be an OPTForCausalLM, got {type(assistant_model).__name__}"
        )
    if assistant_params is None:
        raise ValueError("assistant_model needs assistant_params")
    draft = assistant_model.config
    if draft.vocab_size != config.vocab_size:
        raise ValueError(
            f"the assistant's vocabulary ({draft.vocab_size} ids) differs from the model's "
            f"({config.vocab_size}): draft and target must share one tokenizer and embedding size"
        )
    return draft


def _speculative(model, params, input_ids, attention_mask, gen_config, seed, prng_key,
                 streamer, assistant_model, assistant_params) -> GenerateOutput:  # fmt: skip
    config = model.config
    draft_config = _check_speculative(config, gen_config, assistant_model, assistant_params)
    lookup = gen_config.prompt_lookup_num_tokens
    k = lookup if lookup is not None else gen_config.num_assistant_tokens
    # Drafts per step, static (the draft length itself is traced): a multiple of 4, with room
    # for the heuristic schedule to grow the draft by 8.
    capacity = k if lookup is not None else round_up(k, 4)
    if lookup is None and gen_config.num_assistant_tokens_schedule == "heuristic":
        capacity += 8
    room = capacity + 1  # the verify pass writes this many slots past the committed tokens
    ids, mask = check_prompt(input_ids, attention_mask, config, gen_config.max_new_tokens)
    for who, c in (("the model", config), ("the assistant", draft_config)):
        if c is not None and ids.shape[1] + gen_config.max_new_tokens + room > (
            c.max_position_embeddings
        ):
            raise ValueError(
                f"prompt length {ids.shape[1]} + max_new_tokens {gen_config.max_new_tokens} + "
                f"{room} slots for drafts exceeds {who}'s max_position_embeddings "
                f"{c.max_position_embeddings}: speculative decoding verifies {room} tokens "
                "past the text"
            )
    limit = min(c.max_position_embeddings for c in (config, draft_config) if c is not None)
    ids, mask, bucket_prompt, buffer_length, extra = bucketed(
        ids, mask, gen_config, gen_config.max_new_tokens + room, limit,
        gen_config.num_return_sequences,
    )  # fmt: skip
    prng_key = jax.random.key(0 if seed is None else seed) if prng_key is None else prng_key
    values = {name: jnp.float32(v) for name, v in gen_config.values().items()}
    values["num_assistant_tokens"] = jnp.float32(k)
    program = _compiled_speculative(
        config, draft_config, gen_config.program(), capacity, streamer is not None
    )
    params = nn.unbox(params)
    draft_params = None if draft_config is None else nn.unbox(assistant_params)
    heads = (lm_head_copy(params), None if draft_params is None else lm_head_copy(draft_params))
    stream_id = 0
    if streamer is not None:
        aligned = StepAligner(streamer, ids.shape[0], gen_config.pad_token_id)
        stream_id = _register_streamer(aligned)
    try:
        tokens, logprobs, acceptance = program(
            params, draft_params, heads, jnp.asarray(ids), jnp.asarray(mask), prng_key, values,
            gen_config.max_new_tokens, jnp.int32(stream_id), buffer_length,
        )  # fmt: skip
        tokens = np.asarray(tokens)  # waits for the device, and so for every streamed token
    finally:
        if streamer is not None:
            _unregister_streamer(stream_id)
    steps = gen_config.max_new_tokens
    return GenerateOutput(
        sequences=tokens[:, extra : bucket_prompt + steps].astype(np.int32),
        logprobs=np.asarray(logprobs)[:, :steps] if gen_config.output_logprobs else None,
        acceptance=np.asarray(acceptance)[:, :steps] if gen_config.output_acceptance else None,
    )


def _compiled_speculative(
    config, draft_config, program: GenerationConfig, capacity: int, streaming: bool
):
    """The jitted speculative program for (target, draft, static options, capacity)."""

    def run(params, draft_params, heads, prompt, mask, rng, values, max_new, stream_id,
            buffer_length):  # fmt: skip
        TRACE_COUNT["n"] += 1
        target = _every_position(config, params, heads[0])
        cache = KVCache.init(config, prompt.shape[0], buffer_length)
        draft = draft_cache = None
        if draft_config is not None:
            draft = _every_position(draft_config, draft_params, heads[1])
            draft_cache = KVCache.init(draft_config, prompt.shape[0], buffer_length)
        return speculative_decode(
            target, draft, program, values, prompt, mask, cache, draft_cache, rng, max_new,
            buffer_length, capacity, config.vocab_size,
            _speculative_dispatch if streaming else None, stream_id,
        )  # fmt: skip

    key = ("speculative", config, draft_config, program, capacity, streaming)
    return PROGRAMS.get(key, lambda: jax.jit(run, static_argnums=(9,)))


def _every_position(config, params, head):
    """(tokens, mask, cache) -> (logits [B, T, V] of every position, cache): what speculative
    decoding verifies drafts with."""
    tokens_to_logits = opt_tokens_to_logits(config, params, head, every_position=True)

    def run(tokens, mask, cache):
        logits, _, cache = tokens_to_logits(tokens, mask, cache)
        return logits, cache

    return run


# ---------------------------------------------------------------------------------------------
# The compiled programs
# ---------------------------------------------------------------------------------------------
# Counts traces of the jitted generation programs (the compile-once tests read it).
TRACE_COUNT = {"n": 0}
PROGRAMS = ProgramCache(COMPILE_CACHE_SIZE)


def _compiled(config, program: GenerationConfig, streaming: bool):
    """The jitted program for (model config, static options, streaming), LRU-cached."""

    def run(params, head, prompt, mask, rng, values, max_new, stream_id, buffer_length):
        TRACE_COUNT["n"] += 1
        tokens_to_logits = opt_tokens_to_logits(config, params, head)
        cache = KVCache.init(config, prompt.shape[0], buffer_length)
        if program.is_beam:
            return beam_search(
                tokens_to_logits, program, prompt, mask, cache, max_new, buffer_length, rng, values
            )
        tokens, logprobs = decode(
            tokens_to_logits, program, prompt, mask, cache, rng, max_new, buffer_length,
            _stream_dispatch if streaming else None, stream_id if streaming else None, values,
        )  # fmt: skip
        return tokens, logprobs, None

    return PROGRAMS.get((config, program, streaming), lambda: jax.jit(run, static_argnums=(8,)))


def opt_tokens_to_logits(config, params, head=None, every_position: bool = False):
    """tokens_to_logits for an OPTForCausalLM: runs the decoder with the cache and computes the
    tied-head logits for the last position only (the prefill needs no others), or for every
    position ([B, T, V]: speculative decoding verifies several drafts at once).

    head: optional [P, V] copy of the embedding (see lm_head_copy) used for the LM head matmul.
    """
    decoder = OPTModel(config)

    def tokens_to_logits(tokens, mask, cache):
        out = decoder.apply({"params": params["model"]}, tokens, mask, cache=cache)
        hidden = out.last_hidden_state  # [B, T, P]
        read = hidden if every_position else hidden[:, -1]
        read = read.astype(config.compute_dtype)
        if head is None:
            embedding = tied_embedding(params).astype(config.compute_dtype)
            logits = jnp.einsum("...p,vp->...v", read, embedding)
        else:
            logits = jnp.einsum("...p,pv->...v", read, head.astype(config.compute_dtype))
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
    table = tied_embedding(params)
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


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------
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


class StepAligner:
    """Turns speculative iterations (each row's 1 .. K + 1 new tokens, rows at different steps)
    into the streamer's contract, the one plain decoding keeps: streamer(step, tokens [B]) for
    step 0, 1, ..., with every row's token of that step (the pad id once a row has finished).
    Step t is sent once every row has made its t-th token or finished."""

    def __init__(self, streamer: Callable, rows: int, pad_id: int):
        self.streamer, self.pad_id = streamer, pad_id
        self.made: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.step = 0

    def __call__(self, new: np.ndarray, count: np.ndarray, done: np.ndarray) -> bool:
        for row, (tokens, n, finished) in enumerate(zip(new, count, done, strict=True)):
            self.made[row].extend(int(t) for t in tokens[:n])
            self.done[row] = bool(finished)
        while True:
            have = [len(m) > self.step for m in self.made]
            if not any(have) or not all(h or d for h, d in zip(have, self.done, strict=True)):
                return True
            tokens = [
                m[self.step] if h else self.pad_id for m, h in zip(self.made, have, strict=True)
            ]
            if self.streamer(self.step, np.array(tokens, np.int32)) is False:
                return False
            self.step += 1


def _speculative_dispatch(stream_id, new, count, done):
    """Forwards one speculative iteration's tokens to the StepAligner of call `stream_id`."""
    with _STREAMERS_LOCK:
        aligned = _STREAMERS.get(int(stream_id))
    if aligned is None:
        return np.bool_(False)
    return np.bool_(aligned(np.asarray(new), np.asarray(count), np.asarray(done)))


def _stream_dispatch(stream_id, step, tokens):
    """Forwards one step's tokens to the streamer of call `stream_id`. Returns False (stop
    decoding) when that call has no streamer any more or the streamer returned False."""
    with _STREAMERS_LOCK:
        streamer = _STREAMERS.get(int(stream_id))
    if streamer is None:
        return np.bool_(False)
    return np.bool_(streamer(int(step), np.asarray(tokens)) is not False)
