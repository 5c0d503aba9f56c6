"""What every zero-shot evaluation and perplexity needs: log-likelihoods of continuations,
batched and length-bucketed so a few shapes compile once, and sliding-window perplexity.

Token-level core: `score_pairs(model, params, pairs)` takes (context ids, continuation ids)
pairs, as lm-eval's `_loglikelihood_tokens` does: the model reads (context + continuation)[:-1]
(left-truncated to max_length tokens) and the last len(continuation) positions are scored.
Short requests are packed several to a row, kept apart by the decoder's segment_ids.
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
from opt_jax.tokenizer import OPTTokenizer

# Requests are packed several to a row (segment_ids keep them apart) into rows of this many
# tokens, or of the longest request rounded up to BUCKET if that is longer, capped at the
# model's context: one shape for the decoder per call, and little padding. (128: 400 requests
# of ~26 tokens scored in 14.0 s on 2 CPU cores, against 14.8 s with 64, 16.5 s with 256, whose
# attention over longer rows costs more, and 15.5 s for length buckets without packing.)
PACK_LENGTH = 128
BUCKET = 32
SCORED_BUCKET = 64  # scored positions per batch, rounded up (the LM head's shapes)
_PROGRAMS: dict = {}


def _programs(config):
    """Two jitted programs, so that a new number of scored positions recompiles only the small
    second one:

      hidden(params, inputs [B, T], mask [B, T], segments [B, T]) -> [B, T, P] final hidden
        states of packed rows;
      head(params, hidden, positions [K], targets [K]) -> (log p(target) [K], target is the
        argmax [K]) at the batch's K scored positions (indices into its B x T tokens).

    Only the scored positions go through the LM head: its [P, V] matmul and the log-softmax
    over V would otherwise cost as much as the whole decoder for short continuations.
    """
    if config not in _PROGRAMS:
        decoder = OPTModel(config)

        def hidden(params, inputs, mask, segments):
            out = decoder.apply({"params": params["model"]}, inputs, mask, segment_ids=segments)
            return out.last_hidden_state

        def head(params, hidden, positions, targets):
            hidden = hidden.reshape(-1, hidden.shape[-1])[positions]  # [K, P]
            table = params["model"]["decoder"]["embed_tokens"]["embedding"]
            logits = jnp.einsum(
                "kp,vp->kv",
                hidden.astype(config.compute_dtype),
                table.astype(config.compute_dtype),
            ).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            chosen = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            return chosen, jnp.argmax(logits, axis=-1) == targets

        _PROGRAMS[config] = (jax.jit(hidden), jax.jit(head))
    return _PROGRAMS[config]


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


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

    Requests are packed into rows of PACK_LENGTH tokens (each attends only to itself, with its
    own positions: the same numbers as scoring it alone), `batch_size` rows per forward pass.

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
    length = min(limit, max(_round_up(longest, BUCKET), PACK_LENGTH))
    rows = _pack([len(r[0]) for r in requests], length)
    hidden_fn, head_fn = _programs(config)
    params = nn.unbox(params)
    results: list = [None] * len(requests)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        scored = _round_up(sum(requests[i][2] for row in batch for i in row), SCORED_BUCKET)
        inputs = np.full((batch_size, length), config.pad_token_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        segments = np.zeros((batch_size, length), np.int32)
        positions = np.zeros((scored,), np.int32)  # into the batch's flattened tokens
        targets = np.zeros((scored,), np.int32)
        spans, slot = [], 0  # (request, first scored slot, count)
        for j, row in enumerate(batch):
            offset = 0
            for segment, i in enumerate(row, start=1):
                inp, tgt, n = requests[i]
                end = offset + len(inp)
                inputs[j, offset:end], segments[j, offset:end] = inp, segment
                mask[j, offset:end] = 1
                positions[slot : slot + n] = j * length + np.arange(end - n, end)
                targets[slot : slot + n] = tgt[len(tgt) - n :]
                spans.append((i, slot, n))
                offset, slot = end, slot + n
        mask[len(batch) :, 0] = 1  # filler rows: one real token each
        hidden = hidden_fn(params, inputs, mask, segments)
        logp, greedy = (np.asarray(x) for x in head_fn(params, hidden, positions, targets))
        for i, slot, n in spans:
            results[i] = (
                float(logp[slot : slot + n].astype(np.float64).sum()),
                bool(greedy[slot : slot + n].all()),
            )
        if progress is not None:
            progress(len(spans))
    return results


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
