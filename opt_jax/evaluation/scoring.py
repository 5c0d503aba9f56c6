"""What every zero-shot evaluation and perplexity needs: log-likelihoods of continuations,
batched and length-bucketed so a few shapes compile once, and sliding-window perplexity.

Token-level core: `score_pairs(model, params, pairs)` takes (context ids, continuation ids)
pairs, as lm-eval's `_loglikelihood_tokens` does: the model reads (context + continuation)[:-1]
(left-truncated to max_length tokens) and the last len(continuation) positions are scored.
Short requests are packed several to a row, and continuations of the same context (the
choices of a multiple-choice question) share one copy of it: a full [B, T, T] attention mask
keeps each continuation to its context and itself.
Text level: `loglikelihood` applies OPT's tokenizer contract (`</s>` before the context) and
lm-eval's pair encoding (trailing context spaces move to the continuation; the continuation is
what encoding the whole string adds to encoding the context).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from opt_jax.model import OPTForCausalLM, OPTModel
from opt_jax.param_tree import tied_embedding
from opt_jax.shapes import ProgramCache, round_up
from opt_jax.tokenizer import OPTTokenizer

# Requests are packed several to a row (the attention mask keeps them apart) into rows of this
# many tokens, or of the longest request rounded up to BUCKET if that is longer, capped at the
# model's context: one shape for the decoder per call, and little padding. (160, measured on
# 400 multiple-choice requests of ~26 tokens, a question's four sharing one ~13-token context,
# 2 CPU cores: 8.5 s warm against 9.4 s with 128 and 8.8 s with 192; rows of 128 held 1.7
# questions on average, of 160 2.1. Before contexts were shared, 128 beat 64 and 256.)
PACK_LENGTH = 160
BUCKET = 32
SCORED_BUCKET = 64  # the LM head's smallest shape (scored positions per batch): see _head_width
# One (hidden, head) pair per model config; a few configs at most in one process (an
# evaluation loads one model), bounded all the same, like generate's cache.
PROGRAMS = ProgramCache(8)


def _programs(config):
    """Two jitted programs, so that a new number of scored positions recompiles only the small
    second one:

      hidden(params, inputs [B, T], segments [B, T], branches [B, T]) -> [B, T, P] final hidden
        states of packed rows (see `tree_mask`);
      head(params, hidden, positions [K], targets [K]) -> (log p(target) [K], target is the
        argmax [K]) at the batch's K scored positions (indices into its B x T tokens).

    Only the scored positions go through the LM head: its [P, V] matmul and the log-softmax
    over V would otherwise cost as much as the whole decoder for short continuations.
    """

    def build():
        decoder = OPTModel(config)

        def hidden(params, inputs, segments, branches):
            mask = tree_mask(segments, branches)
            out = decoder.apply({"params": params["model"]}, inputs, mask)
            return out.last_hidden_state

        def head(params, hidden, positions, targets):
            hidden = hidden.reshape(-1, hidden.shape[-1])[positions]  # [K, P]
            table = tied_embedding(params)
            return score_targets(
                hidden.astype(config.compute_dtype), table.astype(config.compute_dtype), targets
            )

        return jax.jit(hidden), jax.jit(head)

    return PROGRAMS.get(config, build)


VOCAB_CHUNKS = 16


def score_targets(hidden, table, targets, chunks: int = VOCAB_CHUNKS):
    """(log p(target) [K], whether the target is the argmax [K]) of logits hidden . table^T.

    hidden: [K, P]; table: [V, P] (the tied LM head); targets: [K] int.
    The [K, V] logits are made in `chunks` slices of the vocabulary with a running log-sum-exp:
    on XLA:CPU one [K, V] array and the log-softmax over it cost 1.6x the time for K = 768
    (a fresh 154 MB buffer per call, and reductions over it), and the slices fit the cache.
    The greedy flag is exact, ties included: the target must be the first maximum, as argmax.
    """
    vocab = table.shape[0]
    width = -(-vocab // chunks)
    slices = jnp.pad(table, ((0, chunks * width - vocab), (0, 0))).reshape(chunks, width, -1)
    rows = hidden.shape[0]

    def step(carry, xs):
        top, total, chosen, first = carry  # running max, sum of exp(logit - max), ...
        piece, start = xs
        column = start + jnp.arange(width)
        logits = jnp.einsum("kp,vp->kv", hidden, piece).astype(jnp.float32)
        logits = jnp.where(column[None, :] < vocab, logits, -jnp.inf)  # padding columns
        piece_top = logits.max(axis=-1)
        piece_first = jnp.where(logits == piece_top[:, None], column[None, :], vocab).min(-1)
        new_top = jnp.maximum(top, piece_top)
        total = total * jnp.exp(top - new_top) + jnp.exp(logits - new_top[:, None]).sum(-1)
        first = jnp.where(piece_top > top, piece_first, first)  # an earlier tie stays first
        local = targets - start
        inside = (local >= 0) & (local < width)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, width - 1)[:, None], -1)[:, 0]
        chosen = jnp.where(inside, picked, chosen)
        return (new_top, total, chosen, first), None

    zeros = jnp.zeros((rows,), jnp.float32)
    start = (jnp.full((rows,), -jnp.inf), zeros, zeros, jnp.zeros((rows,), jnp.int32))
    (top, total, chosen, first), _ = jax.lax.scan(step, start, (slices, jnp.arange(chunks) * width))
    return chosen - (top + jnp.log(total)), first == targets


def tree_mask(segments: jax.Array, branches: jax.Array) -> jax.Array:
    """[B, T] segment ids (0: padding) and branch ids -> the decoder's full [B, T, T] mask.

    A row holds units one after the other: a context (branch 0) followed by the continuations
    that share it (branches 1, 2, ...). A token attends causally to its own unit's context and
    to its own branch, so every continuation sees exactly what it would see after the context
    alone in a row (and gets the same positions: the decoder counts what each token sees).
    """
    length = segments.shape[1]
    causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]  # [T, S]
    same_unit = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    key_branch, query_branch = branches[:, None, :], branches[:, :, None]
    on_path = (key_branch == 0) | (key_branch == query_branch)
    return causal[None] & same_unit & on_path


def _pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices of `lengths` grouped into rows whose lengths sum
    to at most `capacity` (every length fits on its own)."""
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(rooms, (lengths[i], -1))
        if at == len(rooms):
            rows.append([i])
            room, row = capacity - lengths[i], len(rows) - 1
        else:
            room, row = rooms.pop(at)
            rows[row].append(i)
            room -= lengths[i]
        bisect.insort(rooms, (room, row))
    return rows


def score_pairs(
    model,
    params,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of the continuation, whether greedy decoding gives it) per pair.

    Requests are packed into rows of PACK_LENGTH tokens, `batch_size` rows per forward pass;
    requests with the same context (after truncation) share one copy of it. Each continuation
    attends only to its context and itself, with its own positions: the same numbers as
    scoring it alone.

    Args:
      model: an OPTForCausalLM. params: its parameters.
      pairs: (context ids, continuation ids); the continuation must be non-empty, the context
        may be empty only if the continuation has two or more tokens (the first is then context).
      batch_size: rows per forward pass (the last batch is padded to it).
      max_length: tokens the model reads (default: its max_position_embeddings); longer inputs
        lose tokens from the left, as lm-eval does. A continuation longer than this is an error.
      progress: called with the number of pairs finished after each batch.
    """
    if not isinstance(model, OPTForCausalLM):
        raise ValueError(f"scoring needs an OPTForCausalLM, got {type(model).__name__}")
    config = model.config
    limit = max_length or config.max_position_embeddings
    requests = []
    for i, (context, continuation) in enumerate(pairs):
        if len(continuation) == 0:
            raise ValueError(f"request {i}: empty continuation (nothing to score)")
        if len(continuation) > limit:
            raise ValueError(
                f"request {i}: continuation of {len(continuation)} tokens exceeds the model's "
                f"{limit}-token context"
            )
        whole = (list(context) + list(continuation))[-(limit + 1) :]
        if len(whole) < 2:
            raise ValueError(
                f"request {i}: needs at least one context token before the continuation"
            )
        requests.append((whole[:-1], whole[1:], len(continuation)))  # inputs, targets, scored
    if not requests:
        return []
    longest = max(len(r[0]) for r in requests)
    length = min(limit, max(round_up(longest, BUCKET), PACK_LENGTH))
    units = _share_contexts(requests, length)
    rows = _pack([u[1] for u in units], length)
    hidden_fn, head_fn = _programs(config)
    params = nn.unbox(params)
    results: list = [None] * len(requests)
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    counts = [sum(requests[i][2] for row in b for u in row for i in units[u][0]) for b in batches]
    widest = round_up(max(counts), SCORED_BUCKET)
    for batch, count in zip(batches, counts, strict=True):
        arrays, spans = _layout(
            [[units[u][0] for u in row] for row in batch], requests, config.pad_token_id,
            (batch_size, length), _head_width(count, widest),
        )  # fmt: skip
        inputs, segments, branches, positions, targets = arrays
        hidden = hidden_fn(params, inputs, segments, branches)
        logp, greedy = (np.asarray(x) for x in head_fn(params, hidden, positions, targets))
        for i, slot, n in spans:
            results[i] = (
                float(logp[slot : slot + n].astype(np.float64).sum()),
                bool(greedy[slot : slot + n].all()),
            )
        if progress is not None:
            progress(len(spans))
    return results


def _layout(rows, requests, pad_id: int, shape: tuple[int, int], scored: int):
    """One batch's arrays. rows: per row, its units (lists of request indices that share a
    context), each laid out as the context, then every member's continuation but its last
    token.

    Returns ((inputs, segments, branches) [B, T], (positions, targets) [scored]) and spans
    (request, first scored slot, count). Positions index the batch's flattened B x T tokens:
    a member's first target is predicted at the context's last token, the rest at its own.
    """
    inputs = np.full(shape, pad_id, np.int32)
    segments = np.zeros(shape, np.int32)  # 0: padding
    branches = np.zeros(shape, np.int32)  # 0: a unit's shared context
    positions = np.zeros((scored,), np.int32)
    targets = np.zeros((scored,), np.int32)
    spans, slot = [], 0
    for j, row in enumerate(rows):
        end = 0
        for segment, members in enumerate(row, start=1):
            inp, _, n = requests[members[0]]
            context = len(inp) - n + 1  # through the first scored position
            inputs[j, end : end + context], segments[j, end : end + context] = (
                inp[:context],
                segment,
            )
            end += context
            last_context = j * shape[1] + end - 1
            for branch, i in enumerate(members, start=1):
                inp, tgt, n = requests[i]
                rest = inp[context:]  # the continuation but its last token
                stop = end + len(rest)
                inputs[j, end:stop], segments[j, end:stop] = rest, segment
                branches[j, end:stop] = branch
                positions[slot] = last_context
                positions[slot + 1 : slot + n] = j * shape[1] + np.arange(end, stop)
                targets[slot : slot + n] = tgt[len(tgt) - n :]
                spans.append((i, slot, n))
                end, slot = stop, slot + n
    return (inputs, segments, branches, positions, targets), spans


def _head_width(count: int, widest: int) -> int:
    """Scored positions the LM head computes for a batch that scores `count`: rounded up to a
    multiple of 64, or of 256 past 256, but at most `widest` (the call's largest batch rounded
    up to 64). A call compiles a few head shapes (0.26 s each for the 125m shape on 2 CPU
    cores), each of which wastes little."""
    step = SCORED_BUCKET if count <= 4 * SCORED_BUCKET else 4 * SCORED_BUCKET
    return min(round_up(count, step), widest)


def _share_contexts(requests, length: int) -> list[tuple[list[int], int]]:
    """Group requests (inputs, targets, scored) whose inputs agree up to their first scored
    position, i.e. one context with several continuations (a multiple-choice question), into
    units of at most `length` tokens: the context once, then each continuation but its last
    token. Returns (request indices, unit length) per unit."""
    groups: dict[tuple, list[int]] = {}
    for i, (inp, _, n) in enumerate(requests):
        groups.setdefault(tuple(inp[: len(inp) - n + 1]), []).append(i)
    units = []
    for context, members in groups.items():
        unit, size = [], len(context)
        for i in members:
            extra = requests[i][2] - 1
            if unit and size + extra > length:  # full: the next unit repeats the context
                units.append((unit, size))
                unit, size = [], len(context)
            unit.append(i)
            size += extra
        units.append((unit, size))
    return units


def encode_pair(tokenizer: OPTTokenizer, context: str, continuation: str):
    """(context ids, continuation ids) as lm-eval encodes a pair for a causal model: trailing
    spaces of the context move to the continuation; the continuation is what encoding the whole
    string adds to encoding the context; the context starts with OPT's `</s>`. An empty context
    is `</s>` alone."""
    if not context:
        return [tokenizer.bos_token_id], tokenizer.encode(continuation, add_prefix=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def loglikelihood(
    model, params, tokenizer: OPTTokenizer, requests: Sequence[tuple[str, str]], **options
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is greedy) for (context, continuation) string pairs.

    Options are score_pairs's (batch_size, max_length, progress). Contexts longer than the model
    are truncated from the left (lm-eval's convention).
    """
    pairs = []
    for i, (context, continuation) in enumerate(requests):
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            raise ValueError(f"request {i}: the continuation {continuation!r} encodes to no token")
        pairs.append((context_ids, continuation_ids))
    return score_pairs(model, params, pairs, **options)


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int):
    """Disjoint windows covering every token once: (context ids, ids to score) pairs, the first
    conditioned on `prefix`, each later one on as many preceding tokens as fit (lm-eval's
    rolling windows with a context length of 1)."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(done + max_length, len(tokens))
        windows.append((tokens[end - max_length - 1 : done], tokens[done:end]))
        done = end
    return windows


def loglikelihood_rolling(
    model, params, tokenizer: OPTTokenizer, texts: Sequence[str], **options
) -> list[float]:
    """Log-likelihood of whole documents: every token after OPT's `</s>` prefix is scored once,
    in windows of the model's context, each conditioned on as much preceding text as fits."""
    limit = options.get("max_length") or model.config.max_position_embeddings
    spans, pairs = [], []
    for text in texts:
        windows = rolling_windows(
            tokenizer.encode(text, add_prefix=False), tokenizer.bos_token_id, limit
        )
        spans.append((len(pairs), len(pairs) + len(windows)))
        pairs += windows
    scores = score_pairs(model, params, pairs, **options)
    return [sum(s for s, _ in scores[a:b]) for a, b in spans]


def perplexity(
    model, params, token_ids: Sequence[int], *, max_length: int, stride: int, batch_size: int = 8
) -> dict:
    """Sliding-window perplexity (transformers' "Perplexity of fixed-length models" recipe).

    Windows of `max_length` tokens start every `stride` tokens; each scores only the tokens no
    earlier window scored, with the rest of the window as context. With stride < max_length
    every token but the first (OPT's `</s>` prefix, which nothing precedes) is scored exactly
    once; with stride == max_length the windows are disjoint and, as in the guide, the first
    token of each window has no context and is not scored. `tokens` counts what was scored
    (the guide's code counts one token fewer per window after the first when
    stride < max_length; the count here is exact).

    Returns:
      {"perplexity", "nll" (mean, nats/token), "tokens" (scored)}.
    """
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in (0, max_length={max_length}], got {stride}")
    if max_length > model.config.max_position_embeddings:
        raise ValueError(
            f"max_length {max_length} exceeds the model's {model.config.max_position_embeddings} "
            "positions"
        )
    tokens = list(token_ids)
    if len(tokens) < 2:
        raise ValueError("perplexity needs at least two tokens")
    pairs, previous_end = [], 1  # token 0 is never a target
    for begin in range(0, len(tokens), stride):
        end = min(begin + max_length, len(tokens))
        # Targets no earlier window scored; a window's first token is only ever context.
        new = min(end - previous_end, end - begin - 1)
        if new > 0:
            pairs.append((tokens[begin : end - new], tokens[end - new : end]))
        previous_end = end
        if end == len(tokens):
            break
    scores = score_pairs(model, params, pairs, batch_size=batch_size, max_length=max_length)
    count = sum(len(c) for _, c in pairs)
    nll = -sum(s for s, _ in scores) / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count}
