"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) inside one `lax.while_loop`.

Axis legend: B rows, Tb bucketed prompt length, L buffer length, K draft tokens per step (Kc the
static capacity, K <= Kc traced), V vocabulary.

Each iteration, for every row at once:
  1. drafting: a small model proposes K tokens from its own KV cache in K calls (the first
     feeds the row's last two tokens: the draft's cache never holds the K-th draft, which no
     call needs, so an iteration's first call adds the token before the last), or, with prompt
     lookup, the K tokens that followed the earliest earlier occurrence of the row's last n-gram;
  2. verifying: the target scores the row's last token and the Kc drafts in one forward pass
     over its cache ([B, Kc + 1] new tokens; drafts beyond K are never accepted);
  3. accepting: greedy keeps the drafts up to the first one that differs from the target's
     argmax, then the target's token there (so the output equals plain greedy decoding, token for
     token); sampling keeps draft x with probability min(1, p(x) / q(x)) and at the first
     rejection samples from norm(max(p - q, 0)), or after a fully accepted draft a bonus token
     from p (so tokens follow the target's distribution p). p and q are the target's and the
     draft's distributions after the same processors and warpers;
  4. committing: each row writes its own 1 .. K + 1 new tokens (fewer at max_new_tokens or EOS)
     and both caches roll back their rejected slots: the row's write index and position move
     back and the slots are masked out, to be overwritten by the next iteration. Rows advance
     by different amounts (per-row cache indices), so a ragged batch stays exact.
Invariant at the top of an iteration: row b holds n_b committed tokens in the buffer, the
target's cache has processed all of them but the last, the draft's all but the last two.

The K of the next iteration follows `num_assistant_tokens_schedule`: "constant", or
"heuristic" (transformers' assisted generation: +2 after a fully accepted draft, else -1, at
least 1, here at most Kc, which generate() sets 8 above the starting length; with a batch, a
step counts as fully accepted when any row accepted every draft). K is a traced value:
changing it never recompiles.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental import io_callback

from opt_jax.generation.config import GenerationConfig
from opt_jax.generation.processors import ends_with, process_logits, warp_logits
from opt_jax.kv_cache import write_rows

# The processors that read a row's history (what was generated before each position).
HISTORY = frozenset({"repetition_penalty", "presence_penalty", "frequency_penalty"})


def _reads_history(gen_config: GenerationConfig) -> bool:
    return bool(
        HISTORY & gen_config.active or gen_config.no_repeat_ngram_size or gen_config.bad_words_ids
    )


@struct.dataclass
class SpecState:
    """Loop carry. tokens / valid: [B, L]; length: [B] committed tokens per row (buffer slots);
    produced: [B] new tokens per row; done: [B]; k: [] current draft length; iteration: [];
    target_cache / draft_cache: the two models' caches (draft None with prompt lookup);
    logprobs: [B, M]; acceptance: [B, M] accepted drafts per iteration (-1: no iteration)."""

    tokens: jax.Array
    valid: jax.Array
    length: jax.Array
    produced: jax.Array
    done: jax.Array
    k: jax.Array
    iteration: jax.Array
    target_cache: Any
    draft_cache: Any
    logprobs: jax.Array
    acceptance: jax.Array


def accept_draft(u, p_draft, q_draft):
    """Leviathan et al.'s rule: keep draft token x, drawn from q, with probability
    min(1, p(x) / q(x)) (u ~ U[0, 1))."""
    return u * q_draft < p_draft


def rewind(cache, drop):
    """The cache with the last `drop` [B] written slots of each row forgotten: write index and
    position move back, and the slots are masked out of attention until overwritten."""
    index = cache.index - drop
    slots = jnp.arange(cache.max_length)[None, :]
    mask = cache.slot_mask & (slots < index[:, None])
    return cache.replace(index=index, position=cache.position - drop, slot_mask=mask)


def _row_slice(x, start, size):
    """x [B, L] -> [B, size]: x[b, start[b] : start[b] + size]."""
    return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, size))(x, start)


def _row_write(x, start, new, count):
    """x [B, L] with new[b, :count[b]] written at start[b] (the rest of the window unchanged)."""
    window = _row_slice(x, start, new.shape[1])
    keep = jnp.arange(new.shape[1])[None, :] < count[:, None]
    return write_rows(x, jnp.where(keep, new.astype(x.dtype), window), start)


def _scores(gen_config, values, logits, tokens, valid, length, written, produced, generated):
    """Processed logits [B, J, V] of J positions, position j seeing the row's `length` [B]
    committed tokens and the first written[j] candidates (tokens / valid [B, J, L] per
    position, from _views)."""
    batch, positions, vocab = logits.shape
    tokens = jnp.broadcast_to(tokens, (batch, positions, tokens.shape[-1]))
    valid = jnp.broadcast_to(valid, tokens.shape)
    flat = lambda x: x.reshape((batch * positions,) + x.shape[2:])  # noqa: E731
    counts = (produced[:, None] + written[None, :]).reshape(-1, 1)
    ends = (length[:, None] + written[None, :]).reshape(-1)
    scores = process_logits(
        gen_config, values, flat(logits), flat(tokens), flat(valid), ends, counts, generated
    )
    return scores.reshape(batch, positions, vocab)


def _views(gen_config, tokens, valid, length, candidates, written):
    """What each scored position has seen: for each count in `written` [J], the buffer with
    candidates[:, :count] written after each row's committed tokens: (tokens, valid)
    [B, J, L]. Without a processor that reads the history, the buffer as it is ([B, 1, L])."""
    if not _reads_history(gen_config):
        return tokens[:, None, :], valid[:, None, :]
    return _written(tokens, valid, length, candidates, written)


def _written(tokens, valid, length, candidates, written):
    """_views' buffers [B, J, L], always."""
    L = tokens.shape[1]
    offset = jnp.arange(L)[None, None, :] - length[:, None, None]  # [B, 1, L] past the row's end
    here = (offset >= 0) & (offset < written[None, :, None])  # [B, J, L]
    gathered = jnp.take_along_axis(
        candidates, jnp.clip(offset[:, 0], 0, candidates.shape[1] - 1), axis=1
    )  # [B, L]
    return (
        jnp.where(here, gathered[:, None, :], tokens[:, None, :]),
        valid[:, None, :] | here,
    )


def _lookup(tokens, valid, length, capacity, ngram):
    """Prompt-lookup drafts: for each row, the tokens after the earliest earlier occurrence of
    its last m-gram (m = ngram .. 1, the largest that occurs). Returns (drafts [B, capacity],
    how many of them are real [B])."""
    batch, L = tokens.shape
    starts = jnp.arange(L)[None, :]
    found = jnp.zeros((batch,), bool)
    begin = jnp.zeros((batch,), jnp.int32)
    for m in range(ngram, 0, -1):
        suffix = _row_slice(tokens, length - m, m)  # [B, m]
        match = jnp.ones((batch, L), bool)
        for i in range(m):
            shifted = jnp.roll(tokens, -i, axis=1)
            shifted_valid = jnp.roll(valid, -i, axis=1)
            match &= (shifted == suffix[:, i : i + 1]) & shifted_valid
        # an occurrence that ends before the row's last token (a continuation exists)
        match &= (starts + m < length[:, None]) & (starts + m <= L)
        first = jnp.argmax(match, axis=1).astype(jnp.int32)
        hit = match.any(axis=1) & ~found
        begin = jnp.where(hit, first + m, begin)
        found |= hit
    drafts = _row_slice(jnp.pad(tokens, ((0, 0), (0, capacity))), begin, capacity)
    available = jnp.where(found, jnp.minimum(length - begin, capacity), 0)
    return drafts, available.astype(jnp.int32)


def speculative_decode(
    target, draft, gen_config: GenerationConfig, values: dict, prompt, prompt_mask,
    target_cache, draft_cache, rng, max_new_tokens, buffer_length: int, capacity: int,
    vocab_size: int, stream=None, stream_id=None,
):  # fmt: skip
    """Speculative decoding (pure; jit it). See the module docstring.

    Args:
      target, draft: (tokens [B, T], mask [B, T], cache) -> (logits [B, T, V] float32 of every
        position, cache); draft is None for prompt lookup.
      prompt, prompt_mask: [B, Tb] left-padded prompts (every row's last token real).
      target_cache, draft_cache: empty caches with buffer_length slots (draft_cache None for
        prompt lookup).
      max_new_tokens: traced scalar; buffer_length: static L >= Tb + max_new_tokens + capacity + 1.
      capacity: static Kc, the most draft tokens per iteration.
      vocab_size: V of both models.
      stream, stream_id: optional host callback stream(stream_id, new [B, Kc + 1], count [B],
        done [B]) -> bool, called after each iteration with each row's new tokens new[b, :count[b]]
        (in order, after those of earlier calls); False ends the loop (every row done).

    Returns:
      (tokens [B, L], logprobs [B, L - Tb], acceptance [B, L - Tb] int32).
    """
    batch, prompt_len = prompt.shape
    pad = gen_config.pad_token_id
    eos = jnp.asarray(gen_config.eos_token_id, jnp.int32)
    sample = gen_config.do_sample
    tokens = jnp.full((batch, buffer_length), pad, jnp.int32).at[:, :prompt_len].set(prompt)
    valid = jnp.zeros((batch, buffer_length), bool).at[:, :prompt_len].set(prompt_mask)
    generated = jnp.arange(buffer_length) >= prompt_len
    # Prefill all but the last prompt token (the draft: all but the last two): the loop feeds
    # each row's last token(s) itself.
    _, target_cache = target(prompt[:, :-1], prompt_mask[:, :-1], target_cache)
    if draft is not None and prompt_len > 2:
        _, draft_cache = draft(prompt[:, :-2], prompt_mask[:, :-2], draft_cache)
    steps = buffer_length - prompt_len
    state = SpecState(
        tokens=tokens, valid=valid, length=jnp.full((batch,), prompt_len, jnp.int32),
        produced=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool),
        k=jnp.clip(values["num_assistant_tokens"].astype(jnp.int32), 1, capacity),
        iteration=jnp.zeros((), jnp.int32), target_cache=target_cache, draft_cache=draft_cache,
        logprobs=jnp.zeros((batch, steps), jnp.float32),
        acceptance=jnp.full((batch, steps), -1, jnp.int32),
    )  # fmt: skip

    def cond(s: SpecState):
        return ~s.done.all() & (s.iteration < steps)

    def body(s: SpecState):
        key = jax.random.fold_in(rng, s.iteration)
        draft_key, accept_key, resample_key = jax.random.split(key, 3)
        last = jnp.take_along_axis(s.tokens, (s.length - 1)[:, None], axis=1)  # [B, 1]
        ones = jnp.ones((batch, 1), bool)

        # -- 1. drafts [B, Kc] and the draft's distributions q [B, Kc, V] -------------------------
        if draft is None:
            drafts, available = _lookup(
                s.tokens, s.valid, s.length, capacity, gen_config.max_matching_ngram_size
            )
            available = jnp.minimum(available, s.k)
            q = None
            draft_cache = None
        else:

            def choose(i, logits, drafts, q):
                """The i-th draft from the draft's logits [B, 1, V] (it has seen i drafts)."""
                seen = _views(gen_config, s.tokens, s.valid, s.length, drafts, i[None])
                scores = _scores(
                    gen_config, values, logits, *seen, s.length, i[None], s.produced, generated
                )[:, 0]  # fmt: skip
                if sample:
                    warped = warp_logits(gen_config, values, scores)
                    token = jax.random.categorical(jax.random.fold_in(draft_key, i), warped)
                else:
                    token = jnp.argmax(scores, axis=-1)
                token = token.astype(jnp.int32)
                drafts = jax.lax.dynamic_update_slice_in_dim(drafts, token[:, None], i, 1)
                if sample:  # q: the distribution each draft was drawn from
                    probs = jax.nn.softmax(warped, axis=-1)[:, None]
                    q = jax.lax.dynamic_update_slice_in_dim(q, probs, i, 1)
                return drafts, q, token[:, None]

            def draft_step(i, carry):
                cache, drafts, q, previous = carry
                logits, cache = draft(previous, ones, cache)  # [B, 1, V]
                return (cache, *choose(i, logits, drafts, q))

            # The first call feeds the token before the last too (padding in a one-token row).
            before = jnp.maximum(s.length - 2, 0)[:, None]
            chunk = jnp.concatenate([jnp.take_along_axis(s.tokens, before, axis=1), last], 1)
            chunk_mask = jnp.take_along_axis(s.valid, before, axis=1) & (s.length >= 2)[:, None]
            logits, draft_cache = draft(
                chunk, jnp.concatenate([chunk_mask, ones], 1), s.draft_cache
            )  # fmt: skip
            q = jnp.zeros((batch, capacity, vocab_size), jnp.float32) if sample else None
            first = choose(jnp.int32(0), logits[:, -1:], jnp.zeros((batch, capacity), jnp.int32), q)
            draft_cache, drafts, q, _ = jax.lax.fori_loop(
                1, s.k, draft_step, (draft_cache, *first)
            )  # fmt: skip
            available = jnp.broadcast_to(s.k, (batch,))

        # -- 2. the target scores the last token and every draft --------------------------------
        chunk = jnp.concatenate([last, drafts], axis=1)  # [B, Kc + 1]
        target_logits, target_cache = target(chunk, jnp.ones_like(chunk, bool), s.target_cache)
        written = jnp.arange(capacity + 1)
        seen = _views(gen_config, s.tokens, s.valid, s.length, drafts, written)
        scores = _scores(
            gen_config, values, target_logits, *seen, s.length, written, s.produced, generated
        )  # fmt: skip

        # -- 3. acceptance -----------------------------------------------------------------------
        position = jnp.arange(capacity)[None, :]
        if sample:
            warped = warp_logits(gen_config, values, scores.reshape(-1, scores.shape[-1]))
            p = jax.nn.softmax(warped, axis=-1).reshape(scores.shape)
            p_draft = jnp.take_along_axis(p[:, :capacity], drafts[..., None], axis=2)[..., 0]
            q_draft = (
                jnp.ones_like(p_draft)
                if q is None
                else jnp.take_along_axis(q, drafts[..., None], axis=2)[..., 0]
            )
            u = jax.random.uniform(accept_key, p_draft.shape)
            ok = accept_draft(u, p_draft, q_draft)
        else:
            best = jnp.argmax(scores, axis=-1).astype(jnp.int32)  # [B, Kc + 1]
            ok = drafts == best[:, :capacity]
        ok &= position < available[:, None]
        accepted = jnp.cumprod(ok, axis=1).sum(axis=1).astype(jnp.int32)  # [B]
        if sample:
            at = accepted[:, None, None]
            p_at = jnp.take_along_axis(p, at, axis=1)[:, 0]  # [B, V]
            if q is None:
                q_full = jax.nn.one_hot(drafts, p.shape[-1], dtype=jnp.float32)
            else:
                q_full = q
            q_at = jnp.take_along_axis(jnp.pad(q_full, ((0, 0), (0, 1), (0, 0))), at, axis=1)[
                :, 0
            ]  # zero after a fully accepted draft (at == available <= Kc)
            q_at = jnp.where((accepted < available)[:, None], q_at, 0.0)
            residual = jnp.maximum(p_at - q_at, 0.0)
            residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_at)
            extra = jax.random.categorical(resample_key, jnp.log(residual)).astype(jnp.int32)
        else:
            extra = jnp.take_along_axis(best, accepted[:, None], axis=1)[:, 0]
        new = jnp.concatenate([drafts, jnp.zeros((batch, 1), jnp.int32)], axis=1)
        new = jnp.where(jnp.arange(capacity + 1)[None, :] == accepted[:, None], extra[:, None], new)

        # -- 4. commit -----------------------------------------------------------------------------
        count = accepted + 1
        count = jnp.minimum(count, max_new_tokens - s.produced)
        is_eos = jnp.isin(new, eos)
        if gen_config.stop_sequences:  # the text with new[:, :j + 1] written ends with one
            ends = s.length[:, None] + jnp.arange(1, capacity + 2)[None, :]  # [B, Kc + 1]
            views = _written(s.tokens, s.valid, s.length, new, jnp.arange(1, capacity + 2))
            flat = [v.reshape(-1, v.shape[-1]) for v in views]
            for sequence in gen_config.stop_sequences:
                is_eos |= ends_with(*flat, ends.reshape(-1), sequence).reshape(ends.shape)
        is_eos &= jnp.arange(capacity + 1)[None, :] < count[:, None]
        first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, count)
        count = jnp.where(s.done, 0, jnp.minimum(count, first_eos)).astype(jnp.int32)
        tokens = _row_write(s.tokens, s.length, new, count)
        valid = _row_write(s.valid, s.length, jnp.ones_like(new, bool), count)
        raw = jax.nn.log_softmax(target_logits, axis=-1)
        chosen = jnp.take_along_axis(raw, new[..., None], axis=2)[..., 0]  # [B, Kc + 1]
        logprobs = _row_write(s.logprobs, s.produced, chosen, count)
        acceptance = s.acceptance.at[:, jnp.minimum(s.iteration, steps - 1)].set(
            jnp.where(s.done, -1, jnp.minimum(accepted, count))
        )
        produced = s.produced + count
        done = s.done | is_eos.any(axis=1) | (produced >= max_new_tokens)
        if stream is not None:  # unordered: see decoding.decode's streaming call
            keep = io_callback(
                stream, jax.ShapeDtypeStruct((), jnp.bool_), stream_id, new, count, done,
                ordered=False,
            )  # fmt: skip
            done = done | ~keep
        # The target's cache keeps the committed tokens but the newest, the draft's all but the
        # newest two (fed next iteration): it wrote the two it was fed and K - 1 drafts.
        target_cache = rewind(target_cache, capacity + 1 - count)
        if draft is not None:
            draft_cache = rewind(draft_cache, s.k + 1 - count)
        if gen_config.num_assistant_tokens_schedule == "heuristic":
            full = (accepted == s.k) & ~s.done
            k = jnp.where(full.any(), s.k + 2, s.k - 1)
        else:
            k = s.k
        return SpecState(
            tokens=tokens, valid=valid, length=s.length + count, produced=produced, done=done,
            k=jnp.clip(k, 1, capacity), iteration=s.iteration + 1, target_cache=target_cache,
            draft_cache=draft_cache, logprobs=logprobs, acceptance=acceptance,
        )  # fmt: skip

    state = jax.lax.while_loop(cond, body, state)
    return state.tokens, state.logprobs, state.acceptance
