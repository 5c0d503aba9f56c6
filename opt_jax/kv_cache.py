"""The explicit key/value cache that the model takes and returns.

Axis legend: L layers, B batch, S cache slots, N heads, H head dim, T new tokens.

Every row keeps its own write index and its own position counter, so a left-padded ragged batch
(or rows that started at different times) stays exactly right: positions come from the count of
real tokens a row has seen, and padding slots are masked out of attention forever.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from opt_jax.config import OPTConfig
from opt_jax.parallel import sharding

# Logical axis names of one layer's cache array [B, N, S, H], for sharding rules.
KV_AXES = (sharding.BATCH, sharding.HEADS, sharding.CACHE_LENGTH, sharding.HEAD_DIM)


@struct.dataclass
class KVCache:
    """Preallocated keys and values of every layer plus per-row bookkeeping.

    Keys and values are one array per layer, stored heads-major ([B, N, S, H]): the attention
    contractions of a decode step then read them in place, and each layer's write is an in-place
    update. (A stacked [L, ...] array made XLA copy layer slices, and [.., S, N, H] made it
    transpose the cache every step: together ~1.6x slower batch-8 decoding, see
    experiments/perf/README.md.)

    Attributes:
      key: L-tuple of [B, N, S, H] cached keys (compute dtype); with scan_layers one stacked
        [L, B, N, S, H] array.
      value: like key.
      slot_mask: [B, S] bool, True where a slot holds a real (non-padding) token.
      index: [B] int32, the next slot each row writes.
      position: [B] int32, the position id of each row's next real token (its real-token count).
    """

    key: jax.Array
    value: jax.Array
    slot_mask: jax.Array
    index: jax.Array
    position: jax.Array

    @classmethod
    def init(cls, config: OPTConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache of `max_length` slots per row.

        Raises:
          ValueError: if max_length exceeds max_position_embeddings (a slot past the position
            table could only be reached with a position the model cannot embed).
        """
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(
                "KVCache needs a positive batch_size and max_length, "
                f"got {batch_size}, {max_length}"
            )
        if max_length > config.max_position_embeddings:
            raise ValueError(
                f"KVCache max_length {max_length} exceeds max_position_embeddings "
                f"{config.max_position_embeddings}"
            )
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (batch_size, config.num_attention_heads, max_length, config.head_dim)
        layers = config.num_hidden_layers
        if config.scan_layers:  # stacked, scanned with the stacked parameters
            key = jnp.zeros((layers,) + shape, dtype)
            value = jnp.zeros((layers,) + shape, dtype)
        else:
            key = tuple(jnp.zeros(shape, dtype) for _ in range(layers))
            value = tuple(jnp.zeros(shape, dtype) for _ in range(layers))
        return cls(
            key=key,
            value=value,
            slot_mask=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((batch_size,), jnp.int32),
            position=jnp.zeros((batch_size,), jnp.int32),
        )

    def check_room(self, num_tokens: int) -> None:
        """Raises if `num_tokens` more tokens would run past the end of a concrete cache.

        Inside jit the write index is traced and cannot be checked; decoding validates the
        request on the host instead. (`lax.dynamic_update_slice` would otherwise clamp the
        write and silently overwrite the last slots.)
        """
        if isinstance(self.index, jax.core.Tracer):
            return
        used = int(jnp.max(self.index))
        if used + num_tokens > self.max_length:
            raise ValueError(
                f"KV cache holds {used} of {self.max_length} slots: {num_tokens} more tokens do "
                "not fit"
            )

    def take_rows(self, rows: jax.Array) -> KVCache:
        """The cache of rows `rows` [R] int (repeat, reorder or select beams / candidates)."""
        return map_rows(lambda x, axis: x[(slice(None),) * axis + (rows,)], self)

    @property
    def max_length(self) -> int:
        return self.slot_mask.shape[1]

    @property
    def batch_size(self) -> int:
        return self.slot_mask.shape[0]


def write_rows(buffer: jax.Array, update: jax.Array, index: jax.Array, axis: int = 1) -> jax.Array:
    """Writes update[b] into buffer[b] starting at slot index[b] along `axis`.

    Args:
      buffer: [B, ...] with the slot axis at `axis` (e.g. [B, S] masks, [B, N, S, H] caches).
      update: like buffer, with T slots on `axis`.
      index: [B] int32 start slots. The caller guarantees index + T <= S:
        `lax.dynamic_update_slice` would clamp and silently overwrite the last slots.
    """

    if buffer.shape[0] == 1:  # one row: a plain in-place update (a vmap of one row made XLA
        # squeeze the batch axis and copy the whole buffer every decode step)
        starts = tuple(index[0] if d == axis else 0 for d in range(buffer.ndim))
        return jax.lax.dynamic_update_slice(buffer, update.astype(buffer.dtype), starts)

    def one_row(row, new, start):
        starts = tuple(start if d == axis - 1 else 0 for d in range(row.ndim))
        return jax.lax.dynamic_update_slice(row, new.astype(row.dtype), starts)

    return jax.vmap(one_row)(buffer, update, index)


def map_rows(fn, *caches: KVCache) -> KVCache:
    """The cache whose every array is fn(that array of each of `caches`, its batch axis).

    The one place that knows where the batch axis of each field is (0, or 1 for the stacked
    [L, B, ...] keys and values of scan_layers): taking, resizing and inserting rows all go
    through it. With several caches, fn receives the matching arrays of each, in order.
    """
    stacked = not isinstance(caches[0].key, tuple)

    def kv(*per_cache):  # the keys (or values) of every cache
        if stacked:
            return fn(*per_cache, 1)
        return tuple(fn(*layer, 0) for layer in zip(*per_cache, strict=True))

    def rows(field):
        return fn(*(getattr(c, field) for c in caches), 0)

    return KVCache(
        key=kv(*(c.key for c in caches)),
        value=kv(*(c.value for c in caches)),
        slot_mask=rows("slot_mask"),
        index=rows("index"),
        position=rows("position"),
    )


def take_rows(cache, rows: jax.Array):
    """Rows `rows` of a decoding cache: a KVCache, or any batch-major pytree (fake models)."""
    if isinstance(cache, KVCache):
        return cache.take_rows(rows)
    return jax.tree.map(lambda x: x[rows], cache)
