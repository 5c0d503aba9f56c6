"""The OPT decoder and its heads as Flax linen modules.

Axis legend used in einsum strings and shape comments:
  B batch, T query length, S key length (cache slots), N heads, H head dim, D hidden_size,
  P word_embed_proj_dim, F ffn_dim, V vocab_size, L layers.

Module and parameter names mirror the Hugging Face checkpoint (`model/decoder/layers_3/fc1`
is `model.decoder.layers.3.fc1`), so conversion is a rename + transpose table. Every parameter
and the activations at block boundaries carry logical axis names (see sharding.py).
"""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from opt_jax.config import ACTIVATIONS, REMAT_POLICIES, OPTConfig
from opt_jax.kv_cache import KV_AXES, KVCache, write_rows
from opt_jax.parallel import sharding as ax

# OPT's learned position table has 2 extra rows: real tokens start at row 2, padding uses row 1.
POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5
# Tile of the TPU flash-attention kernel: its key/value blocks must be multiples of 128.
FLASH_BLOCK = 128
# Finite "minus infinity" for masked attention scores: exp() of it is exactly 0, and a fully
# masked row (a padding query) yields a uniform softmax instead of NaN, in any dtype.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
# Every output also carries, when asked for (transformers' names and contents):
#   hidden_states: (L + 1)-tuple of [B, T, D]: the embeddings (after project_in and positions),
#     the output of layers 1 .. L-1, and last the final hidden state (after the final LayerNorm
#     and project_out, so [B, T, P] there), as transformers returns them.
#   attentions: L-tuple of [B, N, T, S] attention probabilities (with a cache, S is the cache's
#     slots: the keys of earlier calls included, unwritten slots 0).
@struct.dataclass
class ModelOutput:
    """last_hidden_state: [B, T, P] (after project_out); cache: the updated KVCache or None."""

    last_hidden_state: jax.Array
    cache: KVCache | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@struct.dataclass
class CausalLMOutput:
    """logits: [B, T, V] float32; cache: the updated KVCache or None."""

    logits: jax.Array
    cache: KVCache | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@struct.dataclass
class SequenceClassifierOutput:
    """logits: [B, num_labels] float32, read at each row's last non-pad token."""

    logits: jax.Array
    cache: KVCache | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@struct.dataclass
class QuestionAnsweringOutput:
    """start_logits, end_logits: [B, T] float32."""

    start_logits: jax.Array
    end_logits: jax.Array
    cache: KVCache | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def _normal(config: OPTConfig, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(config.init_std), names)


def _zeros(names: tuple[str | None, ...]):
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
        kernel = self.param(
            "kernel",
            _normal(cfg, self.in_axes + self.out_axes),
            x.shape[-n_in:] + self.features,
            cfg.params_dtype,
        )
        y = jnp.tensordot(x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype), n_in)
        if self.use_bias:
            bias = self.param("bias", _zeros(self.out_axes), self.features, cfg.params_dtype)
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
            "lora_B", _zeros((None,) + self.out_axes), (r,) + self.features, cfg.params_dtype
        )
        x = nn.Dropout(cfg.lora_dropout)(x, deterministic=deterministic or not cfg.lora_dropout)
        h = jnp.tensordot(x.astype(cfg.compute_dtype), a.astype(cfg.compute_dtype), n_in)  # [.., r]
        h = jnp.tensordot(h, b.astype(cfg.compute_dtype), 1)
        return (cfg.lora_alpha / r) * h


def lora_targeted(config: OPTConfig, path: tuple[str, ...]) -> bool:
    """Whether the Linear at module path `path` carries LoRA adapters: one of lora_targets
    matches its path from the decoder on, "decoder/layers_0/self_attn/q_proj" (with
    scan_layers "decoder/layers/self_attn/q_proj"), whichever head holds the decoder."""
    if "decoder" in path:
        path = path[path.index("decoder") :]
    where = "/".join(path)
    return any(re.search(t, where) for t in config.lora_targets)


def _dense(config, features, in_axes, out_axes, *, use_bias=None, name=None):
    """A Linear layer whose kernel [*in, *out] and bias [*out] carry logical axis names."""
    features = (features,) if isinstance(features, int) else tuple(features)
    use_bias = config.enable_bias if use_bias is None else use_bias
    return Linear(config, features, in_axes, out_axes, use_bias, name=name)


def _layer_norm(config: OPTConfig, name: str) -> nn.LayerNorm:
    affine = config.layer_norm_elementwise_affine
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPS,
        use_scale=affine,
        use_bias=affine,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (ax.EMBED,)),
        bias_init=_zeros((ax.EMBED,)),
        name=name,
    )


def _token_embedding_init(config: OPTConfig):
    # As HF's init: normal(init_std) with the padding row zeroed.
    def init(key, shape, dtype=jnp.float32):
        table = nn.initializers.normal(config.init_std)(key, shape, dtype)
        return table.at[config.pad_token_id].set(0)

    return nn.with_logical_partitioning(init, (ax.VOCAB, ax.EMBED_PROJ))


class OPTAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (HF's OPTAttention)."""

    config: OPTConfig

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
          ([B, T, D], updated (key, value) or None, probabilities [B, N, T, S] or None).
        """
        cfg = self.config
        qkv_axes = (ax.HEADS, ax.HEAD_DIM)
        features = (cfg.num_attention_heads, cfg.head_dim)
        # HF scales q after its bias is added; keep that order for bitwise-close parity.
        q = (
            _dense(cfg, features, (ax.EMBED,), qkv_axes, name="q_proj")(x, deterministic)
            * cfg.head_dim**-0.5
        )
        k = _dense(cfg, features, (ax.EMBED,), qkv_axes, name="k_proj")(x, deterministic)
        v = _dense(cfg, features, (ax.EMBED,), qkv_axes, name="v_proj")(
            x, deterministic
        )  # [B, T, N, H]
        q = nn.with_logical_constraint(q, (ax.BATCH, ax.LENGTH, ax.HEADS, ax.HEAD_DIM))

        if cache_kv is None:
            k_spec = v_spec = "bsnh"
        else:
            # The cache is heads-major so this step's contractions read it without a transpose.
            cache_k = write_rows(cache_kv[0], k.transpose(0, 2, 1, 3), index, axis=2)
            cache_v = write_rows(cache_kv[1], v.transpose(0, 2, 1, 3), index, axis=2)
            # Sharded like the activations: batch over data/fsdp, heads over tensor.
            cache_k = nn.with_logical_constraint(cache_k, KV_AXES)
            cache_v = nn.with_logical_constraint(cache_v, KV_AXES)
            k, v, cache_kv = cache_k, cache_v, (cache_k, cache_v)  # [B, N, S, H]
            k_spec = v_spec = "bnsh"

        no_dropout = deterministic or not cfg.attention_dropout
        fused_ok = no_dropout and head_mask is None and not probs_out
        probs = None
        if cfg.attention_impl == "flash" and cache_kv is None and fused_ok:
            out = _tpu_flash_attention(q, k, v, key_mask=allowed[:, -1, :])
        elif cfg.attention_impl == "dot_product" and fused_ok:
            # jax.nn.dot_product_attention dispatches to cuDNN flash attention on NVIDIA GPUs.
            if k_spec == "bnsh":
                k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, N, H]
            out = jax.nn.dot_product_attention(
                q, k.astype(q.dtype), v.astype(q.dtype), mask=allowed[:, None], scale=1.0
            )
        else:
            # Softmax in float32 whatever the compute dtype; masking with `where` (not an added
            # bias) so a masked score never overflows to -inf.
            scores = jnp.einsum(f"btnh,{k_spec}->bnts", q, k).astype(jnp.float32)
            scores = jnp.where(allowed[:, None, :, :], scores, MASK_VALUE)
            probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
            if head_mask is not None:  # as transformers: after the softmax, before dropout
                probs = probs * head_mask.astype(probs.dtype)[None, :, None, None]
            dropped = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
            out = jnp.einsum(f"bnts,{v_spec}->btnh", dropped, v.astype(cfg.compute_dtype))
        # out: [B, T, N, H]
        out = _dense(cfg, cfg.hidden_size, qkv_axes, (ax.EMBED,), name="out_proj")(
            out, deterministic
        )
        return out, cache_kv, probs if probs_out else None


def _tpu_flash_attention(q, k, v, key_mask):
    """Pallas flash attention for TPUs (jax.experimental.pallas.ops.tpu.flash_attention): causal,
    padding as segment ids, so a real query attends to real keys only.

    Args:
      q: [B, T, N, H], already scaled; k, v: [B, T, N, H].
      key_mask: [B, T] bool. (Without a cache the last query sees every key, so the caller
        passes allowed[:, -1, :].)
    Off TPU it runs only inside `pltpu.force_tpu_interpret_mode()` (the tests).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    if q.shape[1] % FLASH_BLOCK:
        raise ValueError(
            f"attention_impl='flash' needs a sequence length that is a multiple of {FLASH_BLOCK} "
            f"(the kernel's tile), got {q.shape[1]}"
        )
    segments = key_mask.astype(jnp.int32)
    out = tpu_flash.flash_attention(
        q.transpose(0, 2, 1, 3),
        k.transpose(0, 2, 1, 3).astype(q.dtype),
        v.transpose(0, 2, 1, 3).astype(q.dtype),
        segment_ids=tpu_flash.SegmentIds(q=segments, kv=segments),
        causal=True,
        sm_scale=1.0,
    )
    return out.transpose(0, 2, 1, 3)  # [B, T, N, H]


class OPTDecoderLayer(nn.Module):
    """One decoder block, pre-LN (most sizes) or post-LN (opt-350m)."""

    config: OPTConfig

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
        attn_norm = _layer_norm(cfg, "self_attn_layer_norm")
        ffn_norm = _layer_norm(cfg, "final_layer_norm")

        residual = x
        h = attn_norm(x) if cfg.do_layer_norm_before else x
        h, cache_kv, probs = OPTAttention(cfg, name="self_attn")(
            h, allowed, cache_kv, index, deterministic, head_mask, probs_out
        )
        x = residual + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        if not cfg.do_layer_norm_before:
            x = attn_norm(x)

        residual = x
        h = ffn_norm(x) if cfg.do_layer_norm_before else x
        h = _dense(cfg, cfg.ffn_dim, (ax.EMBED,), (ax.MLP,), name="fc1")(
            h, deterministic
        )  # [B, T, F]
        h = nn.with_logical_constraint(act(h), (ax.BATCH, ax.LENGTH, ax.MLP))
        h = _dense(cfg, cfg.hidden_size, (ax.MLP,), (ax.EMBED,), name="fc2")(h, deterministic)
        x = residual + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        if not cfg.do_layer_norm_before:
            x = ffn_norm(x)
        if cfg.layerdrop > 0 and not deterministic:
            # LayerDrop (Fan et al. 2019): skip the whole layer with probability layerdrop.
            skip = jax.random.uniform(self.make_rng("dropout")) < cfg.layerdrop
            x = jnp.where(skip, x_in, x)
        x = nn.with_logical_constraint(x, (ax.BATCH, ax.LENGTH, ax.EMBED))
        return x, (cache_kv, probs, x if hidden_out else None)


def _check_inputs(config: OPTConfig, input_ids, inputs_embeds, attention_mask, cache, extras):
    """Static (trace-time) shape checks; token-id ranges are checked on the host (validation.py).

    Returns:
      (batch, length)
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None and input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    embed_shape = (config.word_embed_proj_dim,)
    if inputs_embeds is not None and (
        inputs_embeds.ndim != 3 or inputs_embeds.shape[2:] != embed_shape
    ):
        raise ValueError(
            f"inputs_embeds must be [batch, length, {config.word_embed_proj_dim}] "
            f"(word_embed_proj_dim), got shape {inputs_embeds.shape}"
        )
    shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    for name, value in (("attention_mask", attention_mask), ("position_ids", extras[0])):
        if value is not None and value.shape != shape:
            raise ValueError(f"{name} shape {value.shape} does not match the input's {shape}")
    head_mask = extras[1]
    heads = (config.num_attention_heads,)
    if head_mask is not None and head_mask.shape not in (heads, (config.num_hidden_layers, *heads)):
        raise ValueError(
            f"head_mask must be [num_heads] = {heads} or [num_layers, num_heads] = "
            f"{(config.num_hidden_layers, *heads)}, got shape {head_mask.shape}"
        )
    length = shape[1]
    if cache is None and length > config.max_position_embeddings:
        raise ValueError(
            f"sequence length {length} exceeds max_position_embeddings "
            f"{config.max_position_embeddings}: OPT has no position embedding beyond it"
        )
    if cache is not None:
        if cache.batch_size != shape[0]:
            raise ValueError(f"cache batch size {cache.batch_size} != input batch size {shape[0]}")
        if length > cache.max_length:
            raise ValueError(f"{length} new tokens do not fit a cache of {cache.max_length} slots")
        cache.check_room(length)
    return shape


class OPTDecoder(nn.Module):
    """Embeddings, the layer stack, the final LayerNorm and project_out (HF's OPTDecoder)."""

    config: OPTConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.word_embed_proj_dim,
            embedding_init=_token_embedding_init(cfg),
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
        )
        self.embed_positions = nn.Embed(
            cfg.max_position_embeddings + POSITION_OFFSET,
            cfg.hidden_size,
            embedding_init=_normal(cfg, (ax.POSITIONS, ax.EMBED)),
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
        )
        if cfg.has_projections:
            self.project_in = _dense(
                cfg, cfg.hidden_size, (ax.EMBED_PROJ,), (ax.EMBED,), use_bias=False
            )
            self.project_out = _dense(
                cfg, cfg.word_embed_proj_dim, (ax.EMBED,), (ax.EMBED_PROJ,), use_bias=False
            )
        if cfg.has_final_layer_norm:
            self.final_layer_norm = _layer_norm(cfg, None)
        layer = OPTDecoderLayer
        if cfg.remat_policy != "none":
            # static_argnums counts `self`: 5 is `deterministic`, 7 and 8 the output flags.
            layer = nn.remat(
                layer,
                static_argnums=(5, 7, 8),
                policy=REMAT_POLICIES[cfg.remat_policy],
                prevent_cse=not cfg.scan_layers,
            )
        if cfg.scan_layers:
            # One traced layer, its parameters stacked along a leading `layers` axis.
            self.layers = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                # allowed, cache, index, deterministic, head_mask, probs_out, hidden_out
                in_axes=(
                    nn.broadcast,
                    0,
                    nn.broadcast,
                    nn.broadcast,
                    0,
                    nn.broadcast,
                    nn.broadcast,
                ),
                length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: ax.LAYERS},
            )(cfg)
        else:
            self.layers = [layer(cfg) for _ in range(cfg.num_hidden_layers)]

    def __call__(
        self,
        input_ids: jax.Array | None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        deterministic: bool = True,
        *,
        inputs_embeds: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        head_mask: jax.Array | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """The decoder stack.

        Args:
          input_ids: [B, T] token ids, or None when inputs_embeds is given (exactly one).
          attention_mask: [B, T], 1 for real tokens; None means no padding.
          cache: optional KVCache (see kv_cache.py).
          deterministic: False enables dropout ("dropout" rng).
          inputs_embeds: [B, T, P] token embeddings (what `embed_tokens` would give, before
            project_in), as transformers' inputs_embeds.
          position_ids: [B, T] 0-based positions replacing the ones derived from the mask
            (OPT's offset of 2 is added here, as in transformers).
          head_mask: [L, N] or [N] (every layer): multiplies each head's attention
            probabilities, as transformers did (0 ablates a head).
          output_attentions: return each layer's attention probabilities [B, N, T, S].
          output_hidden_states: return the L + 1 hidden states (see ModelOutput).
          With head_mask or output_attentions the einsum attention runs (fused kernels do not
          expose probabilities); with neither, nothing of this is computed.

        Returns:
          ModelOutput.
        """
        cfg = self.config
        batch, length = _check_inputs(
            cfg, input_ids, inputs_embeds, attention_mask, cache, (position_ids, head_mask)
        )
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), bool)
        mask = attention_mask.astype(bool)  # [B, T]
        real = mask.astype(jnp.int32)

        if cache is None:
            # Positions from the mask (cumsum * mask - 1): left padding shifts nothing.
            positions = jnp.cumsum(real, axis=1) * real - 1
            key_mask, key_slots = mask, jnp.arange(length)  # [B, S=T], [S]
            query_slots = jnp.broadcast_to(jnp.arange(length), (batch, length))
        else:
            # Each row continues from its own real-token count and its own write slot.
            positions = jnp.where(mask, cache.position[:, None] + jnp.cumsum(real, axis=1) - 1, -1)
            key_mask = write_rows(cache.slot_mask, mask, cache.index)  # [B, S]
            key_slots = jnp.arange(cache.max_length)
            query_slots = cache.index[:, None] + jnp.arange(length)  # [B, T]
        if position_ids is not None:  # transformers' position_ids: 0-based, before the offset
            positions = position_ids.astype(jnp.int32)
        # Causal in slot order, and never attend to a padding slot.
        allowed = key_mask[:, None, :] & (key_slots[None, None, :] <= query_slots[:, :, None])

        # OPT has no embedding scale, embedding LayerNorm or embedding dropout.
        if inputs_embeds is None:
            x = self.embed_tokens(input_ids)  # [B, T, P]
        else:
            x = inputs_embeds.astype(cfg.compute_dtype)
        if cfg.has_projections:
            x = self.project_in(x)  # [B, T, D]
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        x = nn.with_logical_constraint(x, (ax.BATCH, ax.LENGTH, ax.EMBED))
        embeddings = x

        index = None if cache is None else cache.index
        if head_mask is not None and head_mask.ndim == 1:  # one [N] mask for every layer
            head_mask = jnp.broadcast_to(head_mask, (cfg.num_hidden_layers, *head_mask.shape))
        flags = (output_attentions, output_hidden_states)
        if cfg.scan_layers:
            # The cache is stacked [L, ...]: scanned alongside the stacked parameters, as are the
            # head mask rows and (stacked on the way out) probabilities and layer outputs.
            layer_caches = None if cache is None else (cache.key, cache.value)
            x, (layer_caches, probs, hidden) = self.layers(
                x, allowed, layer_caches, index, deterministic, head_mask, *flags
            )
            new_key, new_value = (None, None) if cache is None else layer_caches
            probs = None if probs is None else tuple(probs)  # [L, B, N, T, S] -> L-tuple
            hidden = None if hidden is None else tuple(hidden)
        else:
            new_key, new_value, probs, hidden = [], [], [], []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else (cache.key[i], cache.value[i])
                layer_mask = None if head_mask is None else head_mask[i]
                x, (layer_cache, layer_probs, layer_out) = layer(
                    x, allowed, layer_cache, index, deterministic, layer_mask, *flags
                )
                if cache is not None:
                    new_key.append(layer_cache[0])
                    new_value.append(layer_cache[1])
                probs.append(layer_probs)
                hidden.append(layer_out)
            new_key, new_value = tuple(new_key), tuple(new_value)

        if cfg.has_final_layer_norm:
            x = self.final_layer_norm(x)
        if cfg.has_projections:
            x = self.project_out(x)  # [B, T, P]

        if cache is not None:
            cache = KVCache(
                key=new_key,
                value=new_value,
                slot_mask=key_mask,
                index=cache.index + length,
                position=cache.position + real.sum(axis=1),
            )
        return ModelOutput(
            last_hidden_state=x,
            cache=cache,
            # As transformers: the embeddings, layers 1 .. L-1, then the final hidden state.
            hidden_states=(embeddings, *hidden[:-1], x) if output_hidden_states else None,
            attentions=tuple(probs) if output_attentions else None,
        )

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied LM head: [B, T, P] -> [B, T, V] logits (float32)."""
        return self.embed_tokens.attend(hidden).astype(jnp.float32)

    def readout(self, residual: jax.Array) -> jax.Array:
        """A residual-stream state [B, T, D] read out as the last layer's is: final LayerNorm,
        project_out, tied head -> [B, T, V] float32 logits (the logit lens)."""
        x = self.final_layer_norm(residual) if self.config.has_final_layer_norm else residual
        if self.config.has_projections:
            x = self.project_out(x)
        return self.attend(x)


# The inputs every module takes besides input_ids / attention_mask, with transformers' names
# (see OPTDecoder.__call__): inputs_embeds, position_ids, head_mask, output_attentions,
# output_hidden_states. The heads pass them through as **inputs.


class OPTModel(nn.Module):
    """The bare decoder (HF's OPTModel); its parameters live under `decoder`."""

    config: OPTConfig

    def setup(self):
        self.decoder = OPTDecoder(self.config)

    def __call__(self, input_ids, attention_mask=None, *, cache=None, deterministic=True, **inputs):
        """input_ids, attention_mask: [B, T] -> ModelOutput (last_hidden_state [B, T, P]).

        inputs: inputs_embeds [B, T, P] instead of input_ids (pass None for those),
        position_ids [B, T], head_mask [L, N] or [N], output_attentions, output_hidden_states;
        see OPTDecoder.__call__.
        """
        return self.decoder(input_ids, attention_mask, cache, deterministic, **inputs)


class OPTForCausalLM(nn.Module):
    """OPT with its LM head tied to the token embedding."""

    config: OPTConfig

    def setup(self):
        self.model = OPTModel(self.config)

    def __call__(self, input_ids, attention_mask=None, *, cache=None, deterministic=True, **inputs):
        """
        Args:
          input_ids: [B, T] int token ids (validated on the host, see `validate_token_ids`), or
            None with inputs_embeds.
          attention_mask: [B, T], 1 for real tokens, 0 for padding (left or right).
          cache: optional KVCache; new keys/values are written at each row's index.
          deterministic: False enables dropout / attention dropout / layerdrop ("dropout" rng).
          inputs: inputs_embeds, position_ids, head_mask, output_attentions,
            output_hidden_states (transformers' names; see OPTDecoder.__call__).

        Returns:
          CausalLMOutput with logits [B, T, V] (float32), the updated cache, and hidden_states /
          attentions when asked for.
        """
        out = self.model(
            input_ids, attention_mask, cache=cache, deterministic=deterministic, **inputs
        )
        logits = self.model.decoder.attend(out.last_hidden_state)
        logits = nn.with_logical_constraint(logits, (ax.BATCH, ax.LENGTH, ax.VOCAB))
        return CausalLMOutput(logits, out.cache, out.hidden_states, out.attentions)

    def readout(self, residual: jax.Array) -> jax.Array:
        """[B, T, D] residual stream -> [B, T, V] logits through the final LayerNorm, project_out
        and the tied head (the logit lens; `model.apply(..., method="readout")`)."""
        return self.model.decoder.readout(residual)


def last_non_pad_index(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """[B, T] -> [B]: the rightmost token that is not padding (works for left and right pads)."""
    positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
    return jnp.argmax(positions * (input_ids != pad_token_id), axis=-1)


class OPTForSequenceClassification(nn.Module):
    """OPT with a `score` head read at each row's last non-pad token, as HF does (the last
    position when the input is inputs_embeds: padding cannot be seen there)."""

    config: OPTConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, cache=None, deterministic=True, **inputs):
        cfg = self.config
        out = OPTModel(cfg, name="model")(
            input_ids, attention_mask, cache=cache, deterministic=deterministic, **inputs
        )
        score = _dense(
            cfg, cfg.num_labels, (ax.EMBED_PROJ,), (ax.CLASSES,), use_bias=False, name="score"
        )
        logits = score(out.last_hidden_state).astype(jnp.float32)  # [B, T, num_labels]
        if input_ids is None:
            pooled = logits[:, -1]
        else:
            last = last_non_pad_index(input_ids, cfg.pad_token_id)
            pooled = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]  # [B, labels]
        return SequenceClassifierOutput(pooled, out.cache, out.hidden_states, out.attentions)


class OPTForQuestionAnswering(nn.Module):
    """OPT with a `qa_outputs` head giving span start and end logits per token."""

    config: OPTConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, cache=None, deterministic=True, **inputs):
        cfg = self.config
        out = OPTModel(cfg, name="model")(
            input_ids, attention_mask, cache=cache, deterministic=deterministic, **inputs
        )
        qa = _dense(cfg, 2, (ax.EMBED_PROJ,), (ax.CLASSES,), use_bias=True, name="qa_outputs")
        logits = qa(out.last_hidden_state).astype(jnp.float32)  # [B, T, 2]
        return QuestionAnsweringOutput(
            logits[..., 0], logits[..., 1], out.cache, out.hidden_states, out.attentions
        )


MODEL_CLASSES = {
    "OPTModel": OPTModel,
    "OPTForCausalLM": OPTForCausalLM,
    "OPTForSequenceClassification": OPTForSequenceClassification,
    "OPTForQuestionAnswering": OPTForQuestionAnswering,
}


def model_for(config: OPTConfig) -> nn.Module:
    """The module of `config.architecture` (the head a loaded checkpoint holds)."""
    return MODEL_CLASSES[config.architecture](config)


def _dummy_ids(batch: int = 1, length: int = 1) -> jax.Array:
    return jnp.ones((batch, length), jnp.int32)


def init_params(config: OPTConfig, rng: jax.Array | int = 0, module: nn.Module | None = None):
    """Fresh parameters (plain arrays, no partitioning boxes) of `module` (default: the config's
    architecture)."""
    module = module or model_for(config)
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    variables = jax.jit(module.init)(rng, _dummy_ids())
    return nn.unbox(variables["params"])


def abstract_params(config: OPTConfig, module: nn.Module | None = None):
    """ShapeDtypeStructs of the parameters, with no memory used (`jax.eval_shape`)."""
    module = module or model_for(config)
    variables = jax.eval_shape(module.init, jax.random.key(0), _dummy_ids())
    return nn.unbox(variables["params"])


def param_logical_axes(config: OPTConfig, module: nn.Module | None = None):
    """The logical axis names (a PartitionSpec of names) of every parameter."""
    module = module or model_for(config)
    variables = jax.eval_shape(module.init, jax.random.key(0), _dummy_ids())
    return nn.get_partition_spec(variables)["params"]
