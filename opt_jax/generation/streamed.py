"""Layer-streamed generation: models larger than memory, one decoder layer at a time.

Axis legend: B rows, Tb bucketed prompt length, L buffer length, D hidden size, V vocabulary.

`generate` comes here when its params are a `LayerSource` (the disk one is
checkpoints/offload.py, made by `load_pretrained(path, offload="disk", memory_limit=...)`).
The embeddings, the final LayerNorm and the head stay resident; every forward pass (the prefill,
then one per new token) runs the decoder layer by layer from the host:

    prologue (embed, positions, masks) -> layer 0 -> ... -> layer N-1 -> epilogue (LN, head)

with one compiled program per piece, shared by every layer. While layer i computes, a background
thread fetches the next streamed layer's weights (at most two layers in memory: the one computing
and the one arriving). Layers the memory plan keeps resident are never fetched again. When the
plan puts some layers' KV cache on disk (a large batch's cache can outweigh the model), each
micro-batch's slice of it is read before the layer and written back after, by another thread,
one slice ahead (generation/disk_cache.py).

FlexGen's block schedule (Sheng et al. 2023): all rows of the batch go through a layer before the
next layer is fetched, so each weight byte read serves the whole batch, in micro-batches whose
activations fit the memory plan (the prefill of a long prompt may need several; a decode step
rarely does). Between forward passes the token choice is `decoding.choose` / `decoding.record`,
the very functions of the compiled loop, so greedy output equals `generate` on the same weights
in memory token for token, and seeded sampling draws the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from opt_jax.config import OPTConfig
from opt_jax.generation.config import GenerationConfig
from opt_jax.generation.decoding import choose, record, start
from opt_jax.generation.disk_cache import DiskKVCache
from opt_jax.generation.prompts import GenerateOutput, bucketed, check_prompt
from opt_jax.kv_cache import KVCache
from opt_jax.layers import OPTDecoderLayer
from opt_jax.model import OPTDecoder, positions_and_mask
from opt_jax.param_tree import tied_embedding


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """How a call streams: micro-batch rows for the prefill and for decode steps, and the
    layers kept resident (never fetched again)."""

    prefill_rows: int
    decode_rows: int
    resident_layers: tuple[int, ...]
    # Layers whose KV cache goes to disk (generation/disk_cache.py): then prefill_rows ==
    # decode_rows, as the micro-batches' cache regions on disk keep their rows.
    cache_on_disk: tuple[int, ...] = ()


class LayerSource:
    """Weights for layer-streamed generation. Subclasses hold `config` (an OPTConfig),
    `resident` (the parameter tree without the decoder layers, our layout) and implement:

      fetch(i) -> {name: array}: layer i's weights as stored (any layout), called from one
        background thread; they may live in buffers that the fetch after next reuses (the
        caller has finished computing with them by then).
      to_layer_params(weights) -> the layer's parameter tree in our layout, traced inside the
        layer program (transposes, reshapes, casts): a module-level function or another
        hashable callable, as it keys the compiled program.
      plan(batch, buffer_length, prompt_length) -> StreamPlan, raising ValueError (naming the
        limit and what is needed) when the request cannot fit.
      resident_layer(i) -> {name: array}: a layer the plan keeps resident.
    and may set `cache_folder` (where an offloaded KV cache's file goes; None: the system's
    temporary directory), `drop_page_cache` and `stats` (a dict: the cache's traffic is added).
    """

    config: OPTConfig
    resident: dict
    cache_folder: str | None = None
    drop_page_cache: bool = False

    def fetch(self, i: int) -> dict:
        raise NotImplementedError

    def resident_layer(self, i: int) -> dict:
        raise NotImplementedError

    to_layer_params: Callable

    def plan(self, batch: int, buffer_length: int, prompt_length: int) -> StreamPlan:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# The compiled pieces (static: the config; the layer program also the source's layout function)
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _prologue(config, resident, tokens, mask, slot_mask, index, position):
    """Embeddings and masks of a forward pass over tokens [B, T] into a cache whose bookkeeping
    is (slot_mask [B, L], index [B], position [B]). Returns x [B, T, D], allowed [B, T, L] and
    the bookkeeping after the pass."""
    meta = KVCache(key=(), value=(), slot_mask=slot_mask, index=index, position=position)
    positions, allowed, key_mask, real = positions_and_mask(mask, meta, tokens.shape)
    x = OPTDecoder(config).apply(
        {"params": resident["model"]["decoder"]}, tokens, None, positions, method="_embed"
    )
    return x, allowed, key_mask, index + tokens.shape[1], position + real.sum(axis=1)


# The stored weights go to the layer as they are: the layer program casts and transposes them
# as it reads them (a separate conversion program, materialising the layer in float32 once per
# pass, measured 3.5x slower per decode step for 1.3b on 2 CPU cores).
@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(5, 6))
def _layer(config, to_layer_params, weights, x, allowed, key, value, index):
    """One decoder layer over x [B, T, D], writing its keys / values [B, N, L, H] in place."""
    params = to_layer_params(weights)
    x, ((key, value), _, _) = OPTDecoderLayer(config).apply(
        {"params": params}, x, allowed, (key, value), index, True
    )
    return x, key, value


@functools.partial(jax.jit, static_argnums=0)
def _epilogue(config, resident, x):
    """Final LayerNorm, project_out and the tied head of the last position -> [B, V] float32,
    computed as generate's tokens_to_logits computes them."""

    def finish(decoder, x):
        if config.has_final_layer_norm:
            x = decoder.final_layer_norm(x)
        return decoder.project_out(x) if config.has_projections else x

    hidden = OPTDecoder(config).apply({"params": resident["model"]["decoder"]}, x, method=finish)
    read = hidden[:, -1].astype(config.compute_dtype)
    table = tied_embedding(resident).astype(config.compute_dtype)
    return jnp.einsum("bp,vp->bv", read, table).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _advance(program, values, state, rng, prompt_len):
    """One token per row from state.logits, recorded: (state, token [B])."""
    generated = jnp.arange(state.tokens.shape[1]) >= prompt_len
    end = prompt_len + state.step
    token = choose(program, values, state, rng, end, generated)
    return record(program, state, token, end), token


_start = jax.jit(start, static_argnums=(0, 5))


# ---------------------------------------------------------------------------------------------
# Fetching ahead
# ---------------------------------------------------------------------------------------------
class _Prefetcher:
    """Fetches streamed layers in a background thread, one ahead, in cyclic order (the first
    streamed layer of the next pass is fetched while the last one computes)."""

    def __init__(self, source: LayerSource, resident: tuple[int, ...]):
        self.source = source
        self.resident = set(resident)
        self.order = [i for i in range(source.config.num_hidden_layers) if i not in self.resident]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="opt_jax-fetch")
        self.pending: dict[int, Future] = {}

    def wait(self, i: int) -> dict:
        """Layer i's weights (resident, or fetched: waits for the fetch)."""
        if i in self.resident:
            return self.source.resident_layer(i)
        future = self.pending.pop(i, None) or self.pool.submit(self.source.fetch, i)
        return future.result()

    def ahead(self, i: int) -> None:
        """Starts fetching the streamed layer after layer i (the caller has made room)."""
        if not self.order:
            return
        later = [j for j in self.order if j > i]
        j = later[0] if later else self.order[0]
        if j not in self.pending:
            self.pending[j] = self.pool.submit(self.source.fetch, j)

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True)
        self.pending.clear()


@dataclasses.dataclass
class _Rows:
    """One micro-batch: its rows, cache bookkeeping and per-layer keys / values."""

    rows: slice
    slot_mask: jax.Array
    index: jax.Array
    position: jax.Array
    keys: list
    values: list


def _forward(source, prefetcher, groups, tokens, mask, disk=None) -> jax.Array:
    """One forward pass of tokens [B, T] through every layer, micro-batch by micro-batch within
    each layer. Updates the groups' caches (those of `disk`'s layers on disk); returns the last
    position's logits [B, V]."""
    config = source.config
    xs, alloweds = [], []
    for g in groups:
        x, allowed, g.slot_mask, index, g.position = _prologue(
            config, source.resident, tokens[g.rows], mask[g.rows], g.slot_mask, g.index,
            g.position,
        )  # fmt: skip
        xs.append(x)
        alloweds.append(allowed)
    indices = [g.index for g in groups]  # where this pass writes; advanced after the layers
    # Rows advance together (one token each per pass): the slots written are the same in all.
    start = int(indices[0][0]) if disk is not None else 0
    for i in range(config.num_hidden_layers):
        weights = prefetcher.wait(i)
        # The layer before has finished, so its weights are free: room to fetch the next one.
        jax.block_until_ready(xs)
        prefetcher.ahead(i)
        stored = disk is not None and i in disk  # this layer's cache is on disk
        for n, g in enumerate(groups):
            if stored:
                key, value = disk.take(i, n)
                disk.ahead(i, n)
            else:
                key, value = g.keys[i], g.values[i]
            xs[n], key, value = _layer(
                config, source.to_layer_params, weights, xs[n], alloweds[n], key, value,
                indices[n],
            )  # fmt: skip
            if stored:
                disk.put(i, n, key, value, start, tokens.shape[1])
            else:
                g.keys[i], g.values[i] = key, value
            del key, value
        del weights
    for g in groups:
        g.index = g.index + tokens.shape[1]
    return jnp.concatenate([_epilogue(config, source.resident, x) for x in xs])


def _groups(config, batch, rows, buffer_length, on_disk=()) -> list[_Rows]:
    """Micro-batches of `rows` rows (the last may be smaller), each with an empty cache (None
    for the layers whose cache is on disk)."""
    shape = (config.num_attention_heads, buffer_length, config.head_dim)
    groups = []
    for begin in range(0, batch, rows):
        n = min(rows, batch - begin)

        def empty(i, n=n):  # a layer's keys (or values): zeros, or None when on disk
            return None if i in on_disk else jnp.zeros((n, *shape), config.dtype)

        groups.append(
            _Rows(
                rows=slice(begin, begin + n),
                slot_mask=jnp.zeros((n, buffer_length), bool),
                index=jnp.zeros((n,), jnp.int32),
                position=jnp.zeros((n,), jnp.int32),
                keys=[empty(i) for i in range(config.num_hidden_layers)],
                values=[empty(i) for i in range(config.num_hidden_layers)],
            )
        )
    return groups


def _regroup(groups, rows) -> list[_Rows]:
    """The same caches cut into micro-batches of `rows` rows (prefill and decode may differ)."""
    batch = groups[-1].rows.stop
    if [g.rows for g in groups] == [slice(b, min(batch, b + rows)) for b in range(0, batch, rows)]:
        return groups
    cat = functools.partial(jnp.concatenate, axis=0)
    whole = _Rows(
        rows=slice(0, groups[-1].rows.stop),
        slot_mask=cat([g.slot_mask for g in groups]),
        index=cat([g.index for g in groups]),
        position=cat([g.position for g in groups]),
        keys=[cat([g.keys[i] for g in groups]) for i in range(len(groups[0].keys))],
        values=[cat([g.values[i] for g in groups]) for i in range(len(groups[0].keys))],
    )
    groups.clear()  # the old per-group arrays go as soon as the whole-batch copy exists
    out = []
    for begin in range(0, batch, rows):
        part = slice(begin, min(batch, begin + rows))
        out.append(
            _Rows(
                part, whole.slot_mask[part], whole.index[part], whole.position[part],
                [k[part] for k in whole.keys], [v[part] for v in whole.values],
            )
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# generate() on a LayerSource
# ---------------------------------------------------------------------------------------------
def streamed_generate(
    config: OPTConfig,
    source: LayerSource,
    input_ids,
    attention_mask,
    gen_config: GenerationConfig,
    prng_key: jax.Array,
    streamer: Callable | None = None,
) -> GenerateOutput:
    """`generate` for params that stream (see the module docstring); same arguments, same
    result. Greedy decoding and sampling with every processor; not beam or contrastive search.

    Raises:
      ValueError: an option streaming does not take, a model config that is not the source's,
        or a request whose cache and activations cannot fit the source's memory limit.
    """
    if config != source.config:
        raise ValueError(
            "the model's config differs from the offloaded params' config: build the model "
            "from the config load_pretrained returned (OPTForCausalLM(config))"
        )
    if gen_config.is_beam or gen_config.is_contrastive:
        raise ValueError(
            "offloaded (layer-streamed) params generate with greedy decoding or sampling, not "
            "beam search or contrastive search"
        )
    steps = gen_config.max_new_tokens
    ids, mask = check_prompt(input_ids, attention_mask, config, steps)
    ids, mask, bucket_prompt, buffer_length, extra = bucketed(
        ids, mask, gen_config, steps, config.max_position_embeddings,
        gen_config.num_return_sequences,
    )  # fmt: skip
    batch = ids.shape[0]
    plan = source.plan(batch, buffer_length, bucket_prompt)
    program = gen_config.program()
    values = {name: jnp.float32(v) for name, v in gen_config.values().items()}
    prefetcher = _Prefetcher(source, plan.resident_layers)
    disk = None
    try:
        groups = _groups(config, batch, plan.prefill_rows, buffer_length, plan.cache_on_disk)
        if plan.cache_on_disk:
            assert plan.prefill_rows == plan.decode_rows, plan  # regions keep their rows
            disk = DiskKVCache(
                plan.cache_on_disk, [g.rows.stop - g.rows.start for g in groups],
                (config.num_attention_heads, buffer_length, config.head_dim), config.dtype,
                source.cache_folder, source.drop_page_cache,
            )  # fmt: skip
        ids, mask = jnp.asarray(ids), jnp.asarray(mask)
        logits = _forward(source, prefetcher, groups, ids, mask, disk)
        groups = _regroup(groups, plan.decode_rows)
        state = _start(program, ids, mask, logits, None, buffer_length)
        ones = jnp.ones((batch, 1), bool)
        for step in range(steps):
            state, token = _advance(program, values, state, prng_key, bucket_prompt)
            done = np.asarray(state.done)
            if streamer is not None and streamer(step, np.asarray(token)) is False:
                break
            if step + 1 == steps or done.all():
                break  # the loop would stop here: no forward pass for logits nobody reads
            logits = _forward(source, prefetcher, groups, token[:, None], ones, disk)
            state = state.replace(logits=logits)
    finally:
        prefetcher.close()
        if disk is not None:
            disk.close()
            stats = getattr(source, "stats", None)
            if isinstance(stats, dict):
                for name, value in disk.stats.items():
                    stats[f"cache_{name}"] = stats.get(f"cache_{name}", 0) + value
    tokens = np.asarray(state.tokens)  # a stopped stream leaves the rest as padding
    return GenerateOutput(
        sequences=tokens[:, extra : bucket_prompt + steps].astype(np.int32),
        logprobs=np.asarray(state.logprobs)[:, :steps] if gen_config.output_logprobs else None,
    )
