"""The layers OPT is built from: a Linear with logical axis names (and optional LoRA adapters),
LayerNorm, the attention block and the decoder layer (HF's OPTAttention / OPTDecoderLayer).

Axis legend: B batch, T query length, S key length (cache slots with a cache), N heads,
H head dim, D model width, F ffn width.
"""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from opt_jax.config import ACTIVATIONS, OPTConfig
from opt_jax.kv_cache import KV_AXES, write_rows
from opt_jax.ops.attention import EINSUM, attention, choose_impl
from opt_jax.ops.quantized import quantized_matmul
from opt_jax.parallel import sharding as ax

LAYER_NORM_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def normal_init(config: OPTConfig, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(config.init_std), names)


def zeros_init(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class Linear(nn.Module):
    """y = x . kernel (+ bias), contracting the trailing len(in_axes) axes of x.

    The kernel is created directly in its final shape [*in, *out] (no flat init + reshape as in
    nn.DenseGeneral), so its logical axis names hold from the first moment: under a mesh the
    init-time sharding constraint always matches the array's rank.
    """

    config: OPTConfig
    features: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    use_bias: bool

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        n_in = len(self.in_axes)
        if cfg.quantization != "none":
            y = quantized_matmul(self, x, n_in)
        else:
            kernel = self.param(
                "kernel",
                normal_init(cfg, self.in_axes + self.out_axes),
                x.shape[-n_in:] + self.features,
                cfg.params_dtype,
            )
            # As one 2-D product [M, K] x [K, N]: with the kernel's [*in, *out] axes contracted
            # by tensordot, XLA:CPU transposed every kernel for the backward pass (a copy per
            # layer and step; the 2-D form's transposed product needs none): training +9-11%.
            k = math.prod(x.shape[-n_in:])
            flat = x.astype(cfg.compute_dtype).reshape(-1, k)
            y = flat @ kernel.astype(cfg.compute_dtype).reshape(k, -1)
            y = y.reshape(x.shape[:-n_in] + self.features)
        if self.use_bias:
            bias = self.param("bias", zeros_init(self.out_axes), self.features, cfg.params_dtype)
            y = y + bias.astype(cfg.compute_dtype)
        if cfg.lora_rank and lora_targeted(cfg, self.path):
            y = y + self._lora(x, deterministic)
        return y

    def _lora(self, x, deterministic: bool):
        """(alpha / r) * dropout(x) A B, with A [*in, r] and B [r, *out] (PEFT's lora_A / lora_B,
        transposed). As PEFT initialises them: A uniform with bound 1 / sqrt(fan_in) (kaiming
        uniform, a = sqrt(5)), B zero, so a fresh adapter changes nothing."""
        cfg, n_in, r = self.config, len(self.in_axes), self.config.lora_rank
        fan_in = math.prod(x.shape[-n_in:])
        bound = 1.0 / math.sqrt(fan_in)
        init_a = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        a = self.param(
            "lora_A", nn.with_logical_partitioning(init_a, self.in_axes + (None,)),
            x.shape[-n_in:] + (r,), cfg.params_dtype,
        )  # fmt: skip
        b = self.param(
            "lora_B", zeros_init((None,) + self.out_axes), (r,) + self.features, cfg.params_dtype
        )
        x = Dropout(cfg.lora_dropout)(x, deterministic=deterministic or not cfg.lora_dropout)
        h = jnp.tensordot(x.astype(cfg.compute_dtype), a.astype(cfg.compute_dtype), n_in)  # [.., r]
        h = jnp.tensordot(h, b.astype(cfg.compute_dtype), 1)
        return (cfg.lora_alpha / r) * h


class Dropout(nn.Module):
    """Dropout whose keep mask comes from a counter-based hash instead of threefry bits.

    jax.random.bernoulli draws one threefry word per element (~20 rounds of integer work), and
    XLA fuses that generation into the mask's consumers, the forward select and the backward
    one. For the 125m shape (4 x 256 tokens, dropout 0.1) dropout cost ~0.55 s of a 4.7 s
    training step on 2 CPU cores; with this mask the step takes ~0.45 s less.
    Here threefry draws only two 32-bit seeds per leading index (row), and each element hashes
    its index within the row with them (`keep_mask`): about five times fewer integer operations,
    and the mask depends only on the element's coordinates, so every mesh sees the same one.
    Same "dropout" rng stream and the same contract as nn.Dropout: drop with probability
    `rate` (quantised to 2**-32), scale kept values by 1 / (1 - rate).
    """

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep = keep_mask(self.make_rng("dropout"), x.shape, self.rate)
        return jax.lax.select(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


def _mix32(h):
    """A bijective 32-bit integer hash with low bias (Wellons' "lowbias32" constants)."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
    h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """bool [shape], True with probability 1 - rate, independent across elements.

    Row r (index r on the leading axis) gets two seeds (a, b) from threefry; element i of the
    row (its row-major index over the other axes) keeps iff mix(mix(i ^ a) ^ b) >= rate * 2**32.
    Within a row mix is a bijection, so no two elements share a value; across rows, two
    elements share one only if both 32-bit seeds coincide.
    """
    if not shape:
        return keep_mask(key, (1,), rate)[0]
    rows = shape[0]
    seeds = jax.random.bits(key, (2, rows), jnp.uint32)
    # Kept out of the elementwise loop below, which would otherwise recompute them per element.
    seeds = jax.lax.optimization_barrier(seeds)
    inner = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, 0, -1):
        inner = inner + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    expand = (slice(None),) + (None,) * (len(shape) - 1)
    h = _mix32(_mix32(inner ^ seeds[0][expand]) ^ seeds[1][expand])
    threshold = min(round(rate * 2.0**32), 2**32 - 1)
    return h >= jnp.uint32(threshold)


def lora_targeted(config: OPTConfig, path: tuple[str, ...]) -> bool:
    """Whether the Linear at module path `path` carries LoRA adapters: one of lora_targets
    matches its path from the decoder on, "decoder/layers_0/self_attn/q_proj" (with
    scan_layers "decoder/layers/self_attn/q_proj"), whichever head holds the decoder."""
    if "decoder" in path:
        path = path[path.index("decoder") :]
    where = "/".join(path)
    return any(re.search(t, where) for t in config.lora_targets)


def dense(config, features, in_axes, out_axes, *, use_bias=None, name=None):
    """A Linear layer whose kernel [*in, *out] and bias [*out] carry logical axis names."""
    features = (features,) if isinstance(features, int) else tuple(features)
    use_bias = config.enable_bias if use_bias is None else use_bias
    return Linear(config, features, in_axes, out_axes, use_bias, name=name)


def layer_norm(config: OPTConfig, name: str) -> nn.LayerNorm:
    affine = config.layer_norm_elementwise_affine
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPS,
        use_scale=affine,
        use_bias=affine,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (ax.EMBED,)),
        bias_init=zeros_init((ax.EMBED,)),
        name=name,
    )


def token_embedding_init(config: OPTConfig):
    # As HF's init: normal(init_std) with the padding row zeroed.
    def init(key, shape, dtype=jnp.float32):
        table = nn.initializers.normal(config.init_std)(key, shape, dtype)
        return table.at[config.pad_token_id].set(0)

    return nn.with_logical_partitioning(init, (ax.VOCAB, ax.EMBED_PROJ))


def _write_cache(cache_kv, new_k, new_v, index):
    """(key, value) caches [B, N, S, H] with this call's [B, N, T, H] written at `index`."""
    cache_k = write_rows(cache_kv[0], new_k, index, axis=2)
    cache_v = write_rows(cache_kv[1], new_v, index, axis=2)
    # Sharded like the activations: batch over data/fsdp, heads over tensor.
    return (
        nn.with_logical_constraint(cache_k, KV_AXES),
        nn.with_logical_constraint(cache_v, KV_AXES),
    )


class OPTAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (HF's OPTAttention).

    stacked_cache: the layer's cache is a slice of a stacked [L, ...] cache that the caller
    writes (scan_layers): return only this call's keys and values, [B, N, T, H] each.
    """

    config: OPTConfig
    stacked_cache: bool = False

    @nn.compact
    def __call__(
        self, x, allowed, cache_kv, index, deterministic: bool, head_mask=None, probs_out=False
    ):
        """
        Args:
          x: [B, T, D] layer input.
          allowed: [B, T, S] bool, which keys each query may attend to.
          cache_kv: None, or (key, value) each [B, N, S, H]: this layer's cache.
          index: [B] int32 slot at which this call's keys are written (with a cache).
          deterministic: disables attention dropout.
          head_mask: optional [N] multiplier of each head's attention probabilities.
          probs_out: also return the attention probabilities. With either of these the einsum
            path runs whatever `attention_impl` says: fused kernels do not expose probabilities.

        Returns:
          ([B, T, D], updated (key, value) or None (with stacked_cache: this call's), attention
          probabilities [B, N, T, S] or None).
        """
        cfg = self.config
        qkv_axes = (ax.HEADS, ax.HEAD_DIM)
        features = (cfg.num_attention_heads, cfg.head_dim)
        project = lambda name: dense(cfg, features, (ax.EMBED,), qkv_axes, name=name)  # noqa: E731
        # HF scales q after its bias is added; keep that order for bitwise-close parity.
        q = project("q_proj")(x, deterministic) * cfg.head_dim**-0.5  # [B, T, N, H]
        q = nn.with_logical_constraint(q, (ax.BATCH, ax.LENGTH, ax.HEADS, ax.HEAD_DIM))
        # Keys and values heads-major, the cache's layout, so no contraction transposes them.
        k = project("k_proj")(x, deterministic).transpose(0, 2, 1, 3)  # [B, N, T, H]
        v = project("v_proj")(x, deterministic).transpose(0, 2, 1, 3)

        no_dropout = deterministic or not cfg.attention_dropout
        fused_ok = no_dropout and head_mask is None and not probs_out
        impl = choose_impl(cfg.attention_impl, cached=cache_kv is not None, fused_ok=fused_ok)
        # A one-row decoding step (einsum path) attends to the cache as it was and to its own
        # key and value separately, and writes them afterwards. When it read the updated cache,
        # XLA:CPU fused the write (a plain dynamic_update_slice for one row, see write_rows)
        # into both of its consumers, the attention and the decode loop's carry, and copied
        # every layer's cache 4 times per step (8% of a 125m batch-1 step). Several rows write
        # through a vmap that XLA keeps in place, and reading the unwritten cache there made the
        # attention products slower (batch 8: 143 -> 197 ms per 64 steps), so they do not.
        one_step = cache_kv is not None and x.shape[:2] == (1, 1) and impl == EINSUM
        own = None
        new_k, new_v = k, v
        if one_step:
            k, v = cache_kv  # before this step's write
            slot = (jnp.arange(k.shape[2])[None, :] == index[:, None])[:, None, None, :]
            own = (slot, new_k, new_v)  # slot: [B, 1, 1, S]
        elif cache_kv is not None:
            cache_kv = _write_cache(cache_kv, new_k, new_v, index)
            k, v = cache_kv  # [B, N, S, H]

        dropout = Dropout(cfg.attention_dropout)
        out, probs = attention(
            q, k, v, allowed, impl, dtype=cfg.compute_dtype, head_mask=head_mask,
            dropout=lambda p: dropout(p, deterministic=deterministic), own=own,
        )  # fmt: skip
        if cache_kv is not None and self.stacked_cache:
            # A scanned layer's updated cache would be stacked by the scan into a second
            # [L, B, N, S, H] array beside the donated one (the TPU compiler kept a whole
            # cache-sized copy per decode step); its new entries are stacked instead, and the
            # decoder writes them into the stacked cache in place.
            cache_kv = (new_k, new_v)
        elif one_step:
            # The write after the reads: XLA orders operations by their data only, so the
            # written values take a (zero) term from this step's attention output.
            after = 0 * out[:, :1, :1, :1]
            cache_kv = _write_cache(cache_kv, new_k + after, new_v + after, index)
        # out: [B, T, N, H]
        out = dense(cfg, cfg.hidden_size, qkv_axes, (ax.EMBED,), name="out_proj")(
            out, deterministic
        )
        return out, cache_kv, probs if probs_out else None


class OPTDecoderLayer(nn.Module):
    """One decoder block, pre-LN (most sizes) or post-LN (opt-350m)."""

    config: OPTConfig
    stacked_cache: bool = False  # see OPTAttention

    @nn.compact
    def __call__(
        self,
        x,
        allowed,
        cache_kv,
        index,
        deterministic: bool,
        head_mask=None,
        probs_out: bool = False,
        hidden_out: bool = False,
    ):
        """x: [B, T, D] -> ([B, T, D], (updated cache_kv, attention probabilities or None, this
        layer's output or None)); the second part is what nn.scan stacks over layers. See
        OPTAttention for the other arguments; hidden_out asks for the layer's output."""
        cfg = self.config
        x_in = x
        act = ACTIVATIONS[cfg.activation_function]
        attn_norm = layer_norm(cfg, "self_attn_layer_norm")
        ffn_norm = layer_norm(cfg, "final_layer_norm")

        residual = x
        h = attn_norm(x) if cfg.do_layer_norm_before else x
        h, cache_kv, probs = OPTAttention(cfg, self.stacked_cache, name="self_attn")(
            h, allowed, cache_kv, index, deterministic, head_mask, probs_out
        )
        x = residual + Dropout(cfg.dropout)(h, deterministic=deterministic)
        if not cfg.do_layer_norm_before:
            x = attn_norm(x)

        residual = x
        h = ffn_norm(x) if cfg.do_layer_norm_before else x
        h = dense(cfg, cfg.ffn_dim, (ax.EMBED,), (ax.MLP,), name="fc1")(
            h, deterministic
        )  # [B, T, F]
        h = nn.with_logical_constraint(act(h), (ax.BATCH, ax.LENGTH, ax.MLP))
        h = dense(cfg, cfg.hidden_size, (ax.MLP,), (ax.EMBED,), name="fc2")(h, deterministic)
        x = residual + Dropout(cfg.dropout)(h, deterministic=deterministic)
        if not cfg.do_layer_norm_before:
            x = ffn_norm(x)
        if cfg.layerdrop > 0 and not deterministic:
            # LayerDrop (Fan et al. 2019): skip the whole layer with probability layerdrop.
            skip = jax.random.uniform(self.make_rng("dropout")) < cfg.layerdrop
            x = jnp.where(skip, x_in, x)
        x = nn.with_logical_constraint(x, (ax.BATCH, ax.LENGTH, ax.EMBED))
        return x, (cache_kv, probs, x if hidden_out else None)
