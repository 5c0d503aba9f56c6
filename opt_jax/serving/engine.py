"""Continuous batching: one thread owns the model and a KV cache of `max_batch` slots.

Axis legend: B slots (max_batch), S cache length (max_length), Tb bucketed prompt length,
V vocabulary, K top log-probabilities per token.

A request is admitted when enough slots are free: its prompt is prefilled alone (left-padded to
a multiple of `BUCKET` tokens, so a handful of shapes compile, exactly as `generate` pads it)
into a one-row cache, which is copied into each of its choices' slots. Every iteration of the
engine loop then runs one decode step for all B slots at once (idle slots compute on padding
and are ignored), and each active slot's token goes back to its request. A finished or
cancelled choice frees its slot at once, so a waiting request starts without waiting for the
others: the batch is refilled continuously.

Sampling per slot matches `generate` on the request alone: temperature, top-p and OpenAI's
presence / frequency penalties (on the tokens generated so far) are per-slot values, greedy
when temperature is 0. Choice i of a request with `seed` s samples its t-th token with
`jax.random.fold_in(fold_in(key(s), i), t)`: `generate(..., prng_key=fold_in(key(s), i),
top_k=None)` on that prompt alone gives the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from opt_jax.generation.api import lm_head_copy, opt_tokens_to_logits
from opt_jax.generation.processors import presence_frequency_penalty, top_p_filter
from opt_jax.kv_cache import KVCache, map_rows
from opt_jax.param_tree import tied_embedding
from opt_jax.shapes import round_up

BUCKET = 32  # prompt lengths are padded to multiples of this (generate's bucket too)
TOP_LOGPROBS = 5  # OpenAI's completions API allows logprobs <= 5


@dataclasses.dataclass
class Request:
    """One completion request: its prompt ids and options, and where its events go.

    `emit(choice, event)` is called from the engine thread with events
    {"token": id, "logprob": float, "top": [(id, logprob)]} and finally
    {"finish_reason": "stop" | "length" | "cancelled"} (or {"error": message}).
    """

    prompt: list[int]
    max_tokens: int
    emit: Callable[[int, dict], None]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    echo_logprobs: bool = False  # also emit the prompt tokens' log-probabilities first
    stop_ids: tuple[int, ...] = ()  # token ids that end a choice (EOS)
    # Set by the server thread: the client left (every choice), or a stop string ended one
    # choice on the host. The engine frees those slots before its next step.
    cancelled: bool = False
    stopped: set = dataclasses.field(default_factory=set)


class QueueFull(Exception):
    """The engine's waiting queue is at capacity (the server answers 429)."""


class Engine:
    """Runs requests through one OPTForCausalLM with continuous batching.

    Args:
      config, params: the model (any dtype; quantised parameters work as in `generate`).
      max_batch: B, slots decoded together.
      max_length: S, prompt + completion tokens per slot.
      max_queue: requests waiting for slots before `submit` raises QueueFull.
    """

    def __init__(self, config, params, *, max_batch: int = 8, max_length: int = 1024,
                 max_queue: int = 64):  # fmt: skip
        if max_length > config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the model's max_position_embeddings "
                f"{config.max_position_embeddings}"
            )
        self.config, self.params = config, params
        self.max_batch, self.max_length = max_batch, max_length
        self.head = lm_head_copy(params)
        self.waiting: queue.Queue = queue.Queue(maxsize=max_queue)
        self.slots: list = [None] * max_batch  # (request, choice index, generated count)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self._pending: Request | None = None  # admitted next, once it has enough free slots
        self.steps = 0
        self._build()

    # -- the jitted pieces -------------------------------------------------------------------
    def _build(self) -> None:
        config = self.config
        self._prefill = jax.jit(functools.partial(_prefill, config, self.max_length))
        self._insert = jax.jit(_insert, donate_argnums=(0,))
        self._decode = jax.jit(functools.partial(_decode, config), donate_argnums=(2,))
        self._resized = jax.jit(SlotState.resized, static_argnums=(1,))
        self._start_slot = jax.jit(SlotState.start_slot, donate_argnums=(0,))
        # The state holds the first `rows` slots only: a power of two covering the busy ones
        # (the lowest free slots are taken first). Decoding then costs what the load needs, and
        # the donated state is updated in place (slicing a B-row state each step made XLA copy
        # the whole cache: 141 ms instead of 29 ms per step for one request at B = 32).
        self.rows = 1
        self.state = SlotState.empty(config, 1, self.max_length)
        self.options = {
            name: np.zeros((self.max_batch,), np.float32)
            for name in ("temperature", "top_p", "presence", "frequency")
        }
        self.keys = jax.random.split(jax.random.key(0), self.max_batch)

    def rows_for(self, busy: int) -> int:
        """The decode program covering the first `busy` slots: a power of two (or B), so
        log2(B) + 1 programs serve every load."""
        return min(self.max_batch, 1 << max(busy - 1, 0).bit_length())

    def _resize(self, rows: int) -> None:
        if rows != self.rows:
            self.state = self._resized(self.state, rows)
            self.rows = rows

    def warm_up(self, prompt_lengths=(1,)) -> None:
        """Compiles prefill (for these prompt lengths' buckets), insert and the decode step."""
        for length in prompt_lengths:
            done = threading.Event()

            def emit(choice, event, done=done):
                if "finish_reason" in event or "error" in event:
                    done.set()

            request = Request([self.config.bos_token_id] * length, 1, emit)
            self.submit(request)
            if self.thread is None:
                self._run_once_until(done)
            else:
                done.wait()
        for rows in sorted({self.rows_for(b) for b in range(1, self.max_batch + 1)}):
            self._resize(rows)  # every state size's programs, run on idle slots
            options = {k: jnp.asarray(v[:rows]) for k, v in self.options.items()}
            idle = jnp.zeros((rows,), bool)
            self.state = self._decode(
                self.params, self.head, self.state, idle, options, self.keys[:rows]
            )[0]
            self.state = self._start_slot(self.state, 0, self.state.logits[0])
        self._resize(1)

    # -- requests ----------------------------------------------------------------------------
    def check(self, prompt_len: int, max_tokens: int, n: int) -> tuple[str, str] | None:
        """Why a request cannot be served, and the request field at fault (None: it can)."""
        if n > self.max_batch:
            return f"n={n} exceeds the server's max_batch {self.max_batch}", "n"
        if prompt_len < 1:
            return "the prompt is empty", "prompt"
        if prompt_len >= self.max_length:
            return (
                f"the prompt has {prompt_len} tokens; the context holds {self.max_length} "
                "(prompt + completion), nothing is truncated",
                "prompt",
            )
        if prompt_len + max_tokens > self.max_length:
            return (
                f"prompt of {prompt_len} tokens + max_tokens {max_tokens} exceeds the context of "
                f"{self.max_length} tokens",
                "max_tokens",
            )
        return None

    def submit(self, request: Request) -> None:
        problem = self.check(len(request.prompt), request.max_tokens, request.n)
        if problem:
            raise ValueError(problem[0])
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self.waiting.maxsize} requests are already waiting") from None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="opt_jax-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._iteration(block=True)
            except Exception as e:  # fail the requests in the step, keep serving the rest
                for slot, entry in enumerate(self.slots):
                    if entry is not None:
                        entry[0].emit(entry[1], {"error": f"decoding failed: {e}"})
                        self.slots[slot] = None

    def _run_once_until(self, done: threading.Event) -> None:
        while not done.is_set():
            self._iteration(block=False)

    def _free(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None]

    def _admit(self, block: bool) -> None:
        idle = all(s is None for s in self.slots)
        while True:
            free = self._free()
            if not free:
                return
            try:
                request = self.waiting.get(timeout=0.05) if (block and idle) else None
                if request is None:
                    request = self.waiting.get_nowait()
            except queue.Empty:
                return
            idle = False
            if request.cancelled:
                continue
            if request.n > len(free):  # wait for slots; keep its place at the front
                self._pending = request
                return
            self._start(request, free[: request.n])

    def _start(self, request: Request, slots: list[int]) -> None:
        config = self.config
        length = len(request.prompt)
        # The left padding of the bucket takes cache slots too: it must leave the completion
        # its room (a full cache would write every new token over its last slot).
        bucket = max(length, min(round_up(length, BUCKET), self.max_length - request.max_tokens))
        ids = np.full((1, bucket), config.pad_token_id, np.int32)
        mask = np.zeros((1, bucket), bool)
        ids[0, bucket - length :], mask[0, bucket - length :] = request.prompt, True
        try:
            logits, row = self._prefill(self.params, self.head, ids, mask)
        except Exception as e:  # a request that fails never takes the engine down
            for choice in range(request.n):
                request.emit(choice, {"error": f"prefill failed: {e}"})
            return
        if request.echo_logprobs:
            logp = np.asarray(jax.nn.log_softmax(logits[bucket - length : bucket - 1], axis=-1))
            echo = [None] + [
                (float(logp[i, t]), _top(logp[i])) for i, t in enumerate(request.prompt[1:])
            ]
            for choice in range(request.n):
                request.emit(choice, {"prompt_logprobs": echo})
        if request.max_tokens == 0:  # echo only: nothing to decode
            for choice in range(request.n):
                request.emit(choice, {"finish_reason": "length"})
            return
        last = logits[bucket - 1]
        self._resize(max(self.rows, self.rows_for(max(slots) + 1)))
        for choice, slot in enumerate(slots):
            self.state = self._start_slot(self._insert(self.state, row, slot), slot, last)
            greedy = request.temperature <= 0
            self.options["temperature"][slot] = 0.0 if greedy else request.temperature
            self.options["top_p"][slot] = request.top_p
            self.options["presence"][slot] = request.presence_penalty
            self.options["frequency"][slot] = request.frequency_penalty
            key = jax.random.fold_in(jax.random.key(request.seed), choice)
            self.keys = self.keys.at[slot].set(key)
            self.slots[slot] = [request, choice, 0]

    def _iteration(self, block: bool) -> None:
        for slot, entry in enumerate(self.slots):  # cancelled / host-stopped choices leave
            if entry is not None and (entry[0].cancelled or entry[1] in entry[0].stopped):
                self.slots[slot] = None
        pending = self._pending
        if pending is not None:
            if pending.cancelled:
                self._pending = None
            elif len(self._free()) >= pending.n:
                self._pending = None
                self._start(pending, self._free()[: pending.n])
        if self._pending is None:
            self._admit(block)
        if all(s is None for s in self.slots):
            if not block:
                time.sleep(0.001)
            return
        busy = np.array([s is not None for s in self.slots])
        needed = self.rows_for(int(np.flatnonzero(busy).max()) + 1)
        if needed < self.rows:  # the load fell: decode fewer rows
            self._resize(needed)
        rows = self.rows
        options = {k: jnp.asarray(v[:rows]) for k, v in self.options.items()}
        self.state, token, chosen, top_ids, top = self._decode(
            self.params, self.head, self.state, jnp.asarray(busy[:rows]), options,
            self.keys[:rows],
        )  # fmt: skip
        self.steps += 1
        token, chosen, top_ids, top = jax.device_get((token, chosen, top_ids, top))
        for slot, entry in enumerate(self.slots):
            if entry is None:
                continue
            request, choice, count = entry
            t = int(token[slot])
            entry[2] = count = count + 1
            request.emit(choice, {
                "token": t, "logprob": float(chosen[slot]),
                "top": list(zip(top_ids[slot].tolist(), top[slot].tolist(), strict=True)),
            })  # fmt: skip
            finish = None
            if t in request.stop_ids:
                finish = "stop"
            elif count >= request.max_tokens:
                finish = "length"
            if finish:
                request.emit(choice, {"finish_reason": finish})
                self.slots[slot] = None


@struct.dataclass
class SlotState:
    """What the decode step carries for the R slots it covers (R = Engine.rows).

    Attributes:
      cache: KVCache of R rows.
      logits: [R, V] float32, each slot's next-token logits (from its prefill or last step).
      counts: [R, V] int32, how often each token was generated (presence / frequency penalties).
      generated: [R] int32, tokens generated so far (the sampling key's step).
    """

    cache: KVCache
    logits: jax.Array
    counts: jax.Array
    generated: jax.Array

    @classmethod
    def empty(cls, config, rows: int, max_length: int) -> SlotState:
        vocab = config.vocab_size
        return cls(
            cache=KVCache.init(config, rows, max_length),
            logits=jnp.zeros((rows, vocab), jnp.float32),
            counts=jnp.zeros((rows, vocab), jnp.int32),
            generated=jnp.zeros((rows,), jnp.int32),
        )

    def resized(self, rows: int) -> SlotState:
        """The state of `rows` slots: the first ones kept, new ones empty."""

        def fit(x, axis):
            have = x.shape[axis]
            if rows <= have:
                return jax.lax.slice_in_dim(x, 0, rows, axis=axis)
            pad = [(0, 0)] * x.ndim
            pad[axis] = (0, rows - have)
            return jnp.pad(x, pad)

        return SlotState(
            cache=map_rows(fit, self.cache),
            logits=fit(self.logits, 0),
            counts=fit(self.counts, 0),
            generated=fit(self.generated, 0),
        )

    def start_slot(self, slot, logits) -> SlotState:
        """Slot `slot` begins a choice whose first token is drawn from `logits` [V]."""
        return self.replace(
            logits=self.logits.at[slot].set(logits),
            counts=self.counts.at[slot].set(0),
            generated=self.generated.at[slot].set(0),
        )


def _prefill(config, max_length, params, head, ids, mask):
    """[1, Tb] prompt -> (logits of every position [Tb, V], its one-row cache)."""
    cache = KVCache.init(config, 1, max_length)
    step = opt_tokens_to_logits(config, params, head)
    _, hidden, cache = step(ids, mask, cache)  # hidden: what the tied head reads
    table = tied_embedding(params)
    logits = jnp.einsum(
        "tp,vp->tv", hidden[0].astype(config.compute_dtype), table.astype(config.compute_dtype)
    )
    return logits.astype(jnp.float32), cache


def _insert(state: SlotState, row: KVCache, slot) -> SlotState:
    """Copies a one-row cache into slot `slot` of the state's cache."""

    def put(big, small, axis):
        return jax.lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), slot, axis)

    return state.replace(cache=map_rows(put, state.cache, row))


def _sample(scores, options, keys, generated):
    """[R] tokens drawn from scores [R, V] at each slot's temperature and top-p; slot r's draw
    uses fold_in(keys[r], generated[r]), so a choice's t-th token has a key of its own."""
    greedy = options["temperature"] <= 0
    warped = scores / jnp.where(greedy, 1.0, options["temperature"])[:, None]
    # Sorting R x V for top-p costs more than the model step: only when asked.
    warped = jax.lax.cond(
        jnp.any(options["top_p"] < 1),
        lambda w: top_p_filter(w, options["top_p"][:, None]),
        lambda w: w,
        warped,
    )
    step_keys = jax.vmap(jax.random.fold_in)(keys, generated)
    draw = jax.vmap(lambda k, s: jax.random.categorical(k, s[None], axis=-1)[0])
    return draw(step_keys, warped).astype(jnp.int32)


def _decode(config, params, head, state: SlotState, active, options, keys):
    """One token for each of the R slots: sample / argmax from the carried logits, then run the
    model on it.

    Args:
      active: [R] bool, slots serving a choice (idle slots compute on padding).
      options: per-slot [R] float32 "temperature" (0: greedy), "top_p", "presence",
        "frequency".
      keys: [R] each slot's choice key.

    Returns:
      (state, token [R], logprob [R], top ids [R, K], top log-probabilities [R, K])
    """
    scores = presence_frequency_penalty(
        state.logits, state.counts, options["presence"][:, None], options["frequency"][:, None]
    )
    greedy = options["temperature"] <= 0
    # Random draws over R x V cost as much as top-p: skipped when every slot is greedy.
    sampled = jax.lax.cond(
        jnp.all(greedy),
        lambda s: jnp.zeros(s.shape[:1], jnp.int32),
        lambda s: _sample(s, options, keys, state.generated),
        scores,
    )
    token = jnp.where(greedy, jnp.argmax(scores, axis=-1), sampled).astype(jnp.int32)
    logp = jax.nn.log_softmax(state.logits, axis=-1)
    chosen = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    top, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
    step = opt_tokens_to_logits(config, params, head)
    logits, _, cache = step(token[:, None], active[:, None], state.cache)
    new = jax.nn.one_hot(token, config.vocab_size, dtype=jnp.int32) * active[:, None]
    state = SlotState(cache, logits, state.counts + new, state.generated + active)
    return state, token, chosen, top_ids, top


def _top(logp_row: np.ndarray) -> list[tuple[int, float]]:
    ids = np.argsort(-logp_row)[:TOP_LOGPROBS]
    return [(int(i), float(logp_row[i])) for i in ids]
