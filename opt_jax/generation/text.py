"""Text in, text out: generation with OPT's tokenizer contract applied for you."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from opt_jax.generation.api import generate
from opt_jax.generation.config import GenerationConfig
from opt_jax.tokenizer import IncrementalDecoder, OPTTokenizer

# generate()'s keyword arguments that are not GenerationConfig options.
_CALL_ARGUMENTS = ("seed", "prng_key", "streamer", "assistant_model", "assistant_params")


def _stop_sequences(tokenizer: OPTTokenizer, stop_strings) -> list[list[int]]:
    # A string can tokenize differently after a space; stop on either spelling.
    out = []
    for text in stop_strings or ():
        if not text:
            raise ValueError("stop_strings must be non-empty strings")
        for variant in (text, " " + text.lstrip(" ")):
            ids = tokenizer.encode(variant, add_prefix=False)
            if ids not in out:
                out.append(ids)
    return out


def _cut(text: str, stop_strings) -> str:
    """Truncates text at the first stop string (token-level stops may miss a string split
    across unusual token boundaries; this never does)."""
    cuts = [text.find(s) for s in stop_strings or () if s in text]
    return text[: min(cuts)] if cuts else text


def _safe_length(text: str, stop_strings) -> int:
    """Length of the prefix of `text` that no later token can turn into a stop string."""
    safe = len(text)
    for stop in stop_strings or ():
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                safe = min(safe, len(text) - n)
                break
    return safe


def _options(model, tokenizer: OPTTokenizer, stop_strings, kwargs: dict):
    """(GenerationConfig, generate()'s other arguments) for text: the tokenizer's EOS / pad ids
    where the caller set none, its stop strings as token sequences, and its vocabulary size as
    vocab_limit (masking the padded embedding rows no tokenizer id maps to, 50265-50271 for
    real OPT)."""
    model_vocab = model.config.vocab_size
    if tokenizer.vocab_size > model_vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is only "
            f"{model_vocab}: they do not belong together (pass the model's own tokenizer)"
        )
    call = {k: kwargs.pop(k) for k in _CALL_ARGUMENTS if k in kwargs}
    gen_config = (kwargs.pop("generation_config", None) or GenerationConfig()).replace(**kwargs)
    defaults = dict(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_limit=tokenizer.vocab_size,
    )
    gen_config = gen_config.replace(
        **{k: v for k, v in defaults.items() if getattr(gen_config, k) is None},
        stop_sequences=_stop_sequences(tokenizer, stop_strings),
    )
    return gen_config, call


def generate_text(
    model,
    params,
    tokenizer: OPTTokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] | None = None,
    tokens_out: list | None = None,
    **kwargs,
) -> list[str]:
    """Generates a continuation for each prompt; returns the new text only.

    Prompts are strings (given OPT's `</s>` prefix) or token-id lists (used as given), and are
    left-padded; decoding stops at EOS or any of
    `stop_strings` (excluded from the result). Other keyword arguments are `generate`'s.
    With num_return_sequences > 1 the result has that many entries per prompt, in order.
    If `tokens_out` is a list, each result's generated token ids (EOS excluded) are appended
    to it, one list per result.
    """
    if isinstance(prompts, str):
        raise ValueError("generate_text takes a list of prompts; wrap a single one in a list")
    gen_config, call = _options(model, tokenizer, stop_strings, kwargs)
    ids, mask = _encode(tokenizer, prompts)
    out = generate(
        model,
        params,
        ids,
        mask,
        generation_config=gen_config,
        max_new_tokens=max_new_tokens,
        **call,
    )
    new = out.sequences[:, ids.shape[1] :]
    if tokens_out is not None:
        tokens_out.extend(_generated_ids(row, gen_config) for row in new)
    return [_cut(tokenizer.decode(row), stop_strings) for row in new]


def _encode(tokenizer: OPTTokenizer, prompts) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (ids, mask) [B, T] of string prompts (with OPT's `</s>` prefix) or token-id
    lists (as given)."""
    rows = [tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    if not rows or any(not r for r in rows):
        raise ValueError("generate_text needs a non-empty list of non-empty prompts")
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :], mask[i, length - len(row) :] = row, 1
    return ids, mask


def _generated_ids(row, gen_config: GenerationConfig) -> list[int]:
    """A result row's generated ids: without the padding after it finished and its EOS."""
    ids = [int(t) for t in row]
    while ids and ids[-1] == gen_config.pad_token_id:
        ids.pop()
    if ids and ids[-1] in gen_config.eos_token_id:
        ids.pop()
    return ids


def stream_text(
    model,
    params,
    tokenizer: OPTTokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] | None = None,
    tokens_out: list[int] | None = None,
    **kwargs,
) -> Iterator[str]:
    """Yields pieces of one prompt's continuation as the tokens are produced.

    The concatenated pieces equal `generate_text(..., [prompt], ...)[0]`. If `tokens_out` is a
    list, the generated token ids (EOS excluded) are appended to it.

    Closing the generator early (e.g. `break` out of the loop) stops the generation: its
    remaining tokens go nowhere and the background decoding ends at its next step.
    """
    if not isinstance(prompt, str):
        raise ValueError(
            f"stream_text takes one prompt string, got {type(prompt).__name__}; use "
            "generate_text for a list of prompts"
        )
    gen_config, call = _options(model, tokenizer, stop_strings, kwargs)
    # Bad arguments raise here, at the call; decoding starts with the first iteration.
    gen_config = gen_config.replace(max_new_tokens=max_new_tokens).for_model(model.config)
    if gen_config.num_return_sequences > 1 or gen_config.is_beam:
        raise ValueError(
            "stream_text streams one continuation: num_return_sequences and num_beams must be 1 "
            "(use generate_text for several continuations or beam search)"
        )
    if "streamer" in call:
        raise ValueError("stream_text is the streamer: pass no streamer= to it")
    ids, mask = tokenizer.encode_batch([prompt])
    return _stream(model, params, tokenizer, ids, mask, gen_config, call, stop_strings, tokens_out)


def _stream(model, params, tokenizer, ids, mask, gen_config, call, stop_strings, tokens_out):
    """stream_text's generator: decodes in a worker thread, yields text pieces."""
    pieces: queue.Queue = queue.Queue()
    done = object()
    error: list[BaseException] = []
    closed = threading.Event()

    def push(step, tokens):
        if closed.is_set():
            return False  # the consumer went away: stop decoding
        pieces.put(int(tokens[0]))
        return None

    def worker():
        try:
            generate(model, params, ids, mask, generation_config=gen_config, streamer=push, **call)
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)
        finally:
            pieces.put(done)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        tokens: list[int] = [] if tokens_out is None else tokens_out
        decoder = IncrementalDecoder(tokenizer)  # holds back incomplete characters
        shown = ""
        while (item := pieces.get()) is not done:
            if item in gen_config.eos_token_id:
                continue
            tokens.append(item)
            if not decoder.push(item):
                continue
            # Hold back any tail that could still grow into a stop string.
            text = _cut(decoder.text, stop_strings)
            text = text[: _safe_length(text, stop_strings)]
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
        thread.join()
        if error:
            raise error[0]
        decoder.finish()
        final = _cut(decoder.text, stop_strings)
        if len(final) > len(shown):
            yield final[len(shown) :]
    finally:
        # Reached on normal exit and when the caller closes the generator early (break, or
        # garbage collection): the worker's remaining tokens are dropped and its loop stops.
        closed.set()
