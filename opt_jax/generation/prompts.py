"""What every generation path does on the host before compiling: check the prompt, pad it to a
shape bucket with room for the new tokens; and the result type they all return."""

from __future__ import annotations

import numpy as np
from flax import struct

from opt_jax.shapes import round_up
from opt_jax.validation import validate_token_ids

# Prompt and new-token lengths are rounded up to multiples of this for static shapes.
BUCKET = 32


@struct.dataclass
class GenerateOutput:
    """sequences: [B * num_return_sequences, prompt_length + max_new_tokens] int32 (prompt as
    given, then new tokens, pad after EOS); logprobs: [same rows, max_new_tokens] float32 model
    log-probabilities of the chosen tokens (0 after EOS), when requested."""

    sequences: np.ndarray
    logprobs: np.ndarray | None = None
    # Beam search: final (length-penalised) score of each returned sequence.
    sequences_scores: np.ndarray | None = None
    # Speculative decoding with output_acceptance=True: [rows, steps] int32, the drafts each
    # row accepted at each step (-1 after the row's last step).
    acceptance: np.ndarray | None = None


def bucketed(ids, mask, gen_config, need: int, limit: int, copies: int):
    """Static shapes: the prompt bucketed (extra left padding is harmless: positions come from
    the mask) and a buffer with `need` slots after it, capped so that every slot has a position
    embedding (`limit`); each row repeated `copies` times.

    Returns:
      (ids, mask [B * copies, Tb], Tb, buffer length, left padding added)
    """
    prompt_len = ids.shape[1]
    bucket_prompt = min(round_up(prompt_len, BUCKET), limit - need)
    buffer_length = min(bucket_prompt + round_up(need, BUCKET), limit)
    extra = bucket_prompt - prompt_len
    ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=gen_config.pad_token_id)
    mask = np.pad(mask, ((0, 0), (extra, 0)))
    ids, mask = np.repeat(ids, copies, axis=0), np.repeat(mask, copies, axis=0)
    return ids, mask, bucket_prompt, buffer_length, extra


def check_prompt(input_ids, attention_mask, config, max_new_tokens: int):
    """(ids [B, T] int32, mask [B, T] bool) after the host-side checks jitted code cannot do."""
    ids = validate_token_ids(input_ids, config.vocab_size, attention_mask=attention_mask)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    mask = mask.astype(bool)
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"prompt rows {empty.tolist()} are empty (no real token in the mask)")
    if not mask[:, -1].all():
        raise ValueError(
            "prompts must be left-padded (every row's last token real): rows "
            f"{np.flatnonzero(~mask[:, -1]).tolist()} end in padding"
        )
    total = ids.shape[1] + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"max_position_embeddings {config.max_position_embeddings}"
        )
    return ids, mask
