"""Scaled dot-product attention over heads-major keys and values, three ways.

The attention layer (opt_jax/layers.py) projects q, k, v and manages the KV cache; this module
only combines them, so a new kernel is one function here and one name in `IMPLS`.

Axis legend: B batch, T query length, S key length (cache slots with a cache), N heads,
H head dim.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from opt_jax.parallel import sharding

# The names `OPTConfig.attention_impl` takes.
EINSUM, DOT_PRODUCT, FLASH = "einsum", "dot_product", "flash"
IMPLS = (EINSUM, DOT_PRODUCT, FLASH)
# Tile of the TPU flash-attention kernel: its key/value blocks must be multiples of 128.
FLASH_BLOCK = 128
# Finite "minus infinity" for masked attention scores: exp() of it is exactly 0, and a fully
# masked row (a padding query) yields a uniform softmax instead of NaN, in any dtype.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def choose_impl(requested: str, *, cached: bool, fused_ok: bool) -> str:
    """The implementation that runs for `requested` (`attention_impl`).

    Fused kernels expose no probabilities and apply neither dropout nor a head mask
    (`fused_ok` is False when any of those is asked for), and the flash kernel takes no cache
    (a decode step attends one query to S cached keys, which its 128-row tiles do not fit):
    those calls run the einsum path, which computes the same function.
    """
    if requested == FLASH and not cached and fused_ok:
        return FLASH
    if requested == DOT_PRODUCT and fused_ok:
        return DOT_PRODUCT
    return EINSUM


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    allowed: jax.Array,
    impl: str,
    *,
    dtype,
    head_mask: jax.Array | None = None,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
    own: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """softmax(q k^T masked) v for every head.

    Args:
      q: [B, T, N, H] queries, already scaled by head_dim ** -0.5.
      k, v: [B, N, S, H] keys and values (heads-major, the cache's layout).
      allowed: [B, T, S] bool, which keys each query may attend to.
      impl: one of IMPLS, as `choose_impl` resolved it (FLASH: no cache, S == T).
      dtype: the compute dtype of the probabilities and the output.
      head_mask: optional [N] multiplier of each head's probabilities (einsum only).
      dropout: optional function applied to the probabilities (einsum only).
      own: for a one-row decode step that attends to the cache before its own write (einsum
        only): (slot [B, 1, 1, S] bool marking the step's slot, its key and value
        [B, N, 1, H]); the slot then scores against `own`'s key instead of the cache's.

    Returns:
      (out [B, T, N, H], probabilities [B, N, T, S] for EINSUM, else None).
    """
    if impl == FLASH:
        # Without a cache the last query sees every key, so its row is the padding mask.
        return _tpu_flash(q, k, v, key_mask=allowed[:, -1, :]), None
    if impl == DOT_PRODUCT:
        # jax.nn.dot_product_attention dispatches to cuDNN flash attention on NVIDIA GPUs.
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, N, H]
        out = jax.nn.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask=allowed[:, None], scale=1.0
        )
        return out, None
    # Heads-major operands [B, N, T, H]: with [B, T, N, H] ones XLA:CPU fused the softmax into
    # the probabilities x values product and ran the attention 2-3x slower (experiments/perf).
    # Softmax in float32 whatever the compute dtype; masking with `where` (not an added bias)
    # so a masked score never overflows.
    q = q.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bnth,bnsh->bnts", q, k.astype(q.dtype))
    if own is not None:  # this step's own slot scores against its own (unwritten) key
        slot, own_k, own_v = own
        own_score = jnp.einsum("bnth,bnth->bnt", q, own_k.astype(q.dtype))[..., None]
        scores = jnp.where(slot, own_score, scores)
    scores = jnp.where(allowed[:, None, :, :], scores.astype(jnp.float32), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    if head_mask is not None:  # as transformers: after the softmax, before dropout
        probs = probs * head_mask.astype(probs.dtype)[None, :, None, None]
    dropped = probs if dropout is None else dropout(probs)
    if own is not None:
        own_weight = jnp.where(slot, dropped, 0).sum(-1, keepdims=True)  # [B, N, T, 1]
        dropped = jnp.where(slot, 0, dropped)
    out = jnp.einsum("bnts,bnsh->bnth", dropped, v.astype(dtype))
    if own is not None:
        out = out + own_weight * own_v.astype(dtype)
    return out.transpose(0, 2, 1, 3), probs


def _tpu_flash(q, k, v, key_mask):
    """Pallas flash attention for TPUs (jax.experimental.pallas.ops.tpu.flash_attention): causal,
    padding as segment ids, so a real query attends to real keys only.

    Args:
      q: [B, T, N, H], already scaled; k, v: [B, N, T, H].
      key_mask: [B, T] bool.
    Off TPU it runs only inside `pltpu.force_tpu_interpret_mode()` (the tests).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    if q.shape[1] % FLASH_BLOCK:
        raise ValueError(
            f"attention_impl='flash' needs a sequence length that is a multiple of {FLASH_BLOCK} "
            f"(the kernel's tile), got {q.shape[1]}"
        )

    def kernel(q, k, v, segments):  # q, k, v: [B, N, T, H]; segments: [B, T]
        return tpu_flash.flash_attention(
            q, k, v, segment_ids=tpu_flash.SegmentIds(q=segments, kv=segments), causal=True,
            sm_scale=1.0,
        )  # fmt: skip

    return per_device_kernel(kernel, q, k, v, key_mask)


def per_device_kernel(kernel, q, k, v, key_mask):
    """Runs a causal attention kernel `kernel(q, k, v, segments)` (q, k, v: [B, N, T, H],
    segments: [B, T] int32, 1 for real tokens) on q [B, T, N, H] and k, v [B, N, T, H]; returns
    [B, T, N, H]. On a mesh each device runs it on its own rows and heads."""
    args = (q.transpose(0, 2, 1, 3), k.astype(q.dtype), v.astype(q.dtype))
    segments = key_mask.astype(jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*args, segments).transpose(0, 2, 1, 3)  # [B, T, N, H]
    # A Pallas (Mosaic) kernel is not partitioned by XLA: on a mesh each device runs it on its
    # rows and heads (split as the logical rules split batch and heads; no other axis is).
    spec = P(*nn.logical_to_mesh_axes((sharding.BATCH, sharding.HEADS, None, None)))
    out = jax.shard_map(
        kernel, mesh=mesh, in_specs=(spec, spec, spec, P(spec[0], None)), out_specs=spec,
        check_vma=False,
    )(*args, segments)  # fmt: skip
    return out.transpose(0, 2, 1, 3)  # [B, T, N, H]
