"""The OPT decoder and its heads as Flax linen modules.

Axis legend used in einsum strings and shape comments:
  B batch, T query length, S key length (cache slots), N heads, H head dim, D hidden_size,
  P word_embed_proj_dim, F ffn_dim, V vocab_size, L layers.

Module and parameter names mirror the Hugging Face checkpoint (`model/decoder/layers_3/fc1`
is `model.decoder.layers.3.fc1`), so conversion is a rename + transpose table. Every parameter
and the activations at block boundaries carry logical axis names (see sharding.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from opt_jax.config import REMAT_POLICIES, OPTConfig
from opt_jax.kv_cache import KV_AXES, KVCache, write_rows
from opt_jax.layers import (
    OPTDecoderLayer,
    dense,
    layer_norm,
    normal_init,
    token_embedding_init,
)
from opt_jax.ops.attention import EINSUM
from opt_jax.parallel import sharding as ax
from opt_jax.param_tree import from_words, unstack_layers

# OPT's learned position table has 2 extra rows: real tokens start at row 2, padding uses row 1.
POSITION_OFFSET = 2


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
    source = "input_ids" if input_ids is not None else "inputs_embeds"
    shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    if attention_mask is not None and attention_mask.ndim == 3:
        if attention_mask.shape != (*shape, shape[1]):
            raise ValueError(
                f"a full attention_mask must be [batch, length, length] = {(*shape, shape[1])} "
                f"for {source} shape {shape}, got shape {attention_mask.shape}"
            )
        conflicts = {
            "a cache": cache is not None,
            "segment_ids": extras[2] is not None,
            "attention_impl 'flash'": config.attention_impl == "flash",
        }
        for name, bad in conflicts.items():
            if bad:
                raise ValueError(f"a full [B, T, T] attention_mask takes no {name}")
        attention_mask = None  # checked
    named = (("attention_mask", attention_mask), ("position_ids", extras[0]),
             ("segment_ids", extras[2]))  # fmt: skip
    for name, value in named:
        if value is not None and value.shape != shape:
            raise ValueError(f"{name} shape {value.shape} does not match {source} shape {shape}")
    if extras[2] is not None and cache is not None:
        raise ValueError("segment_ids (packed sequences) take no cache: pass one or the other")
    if extras[2] is not None and config.attention_impl == "flash":
        raise ValueError("segment_ids need attention_impl 'einsum' or 'dot_product', not 'flash'")
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


def positions_and_mask(attention_mask, cache, shape, position_ids=None, segment_ids=None):
    """Each token's position and which keys each query may attend to.

    Args:
      attention_mask: None, [B, T] (1 for real tokens) or a full [B, T, T] mask (see
        OPTDecoder.__call__).
      cache: None or the KVCache this call writes into.
      shape: (B, T) of the input.
      position_ids, segment_ids: as OPTDecoder.__call__ takes them (already checked).

    Returns:
      (positions [B, T] int32 (0-based, -1 on padding), allowed [B, T, S] bool, key_mask
      [B, S] bool (which key slots hold real tokens after this call), real [B, T] int32).
    """
    batch, length = shape
    full = None
    if attention_mask is not None and attention_mask.ndim == 3:
        full = attention_mask.astype(bool)  # [B, T, S=T]
        attention_mask = jnp.diagonal(full, axis1=1, axis2=2)  # a token sees itself
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
    if segment_ids is not None:
        # Real tokens before this one in its segment: the running count minus the count
        # before the segment's first token (the run starts where the id changes).
        count = jnp.cumsum(real, axis=1)
        starts = segment_ids != jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
        before = jax.lax.cummax(jnp.where(starts, count - real, 0), axis=1)
        positions = (count - before) * real - 1
    if full is not None:  # a token's position: how many tokens it sees, minus one
        positions = jnp.where(mask, full.sum(axis=2) - 1, -1)
    if position_ids is not None:  # transformers' position_ids: 0-based, before the offset
        positions = position_ids.astype(jnp.int32)
    if full is not None:  # used as given
        return positions, full, key_mask, real
    # Causal in slot order, and never attend to a padding slot
    allowed = key_mask[:, None, :] & (key_slots[None, None, :] <= query_slots[:, :, None])
    if segment_ids is not None:  # nor across packed sequences
        allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return positions, allowed, key_mask, real


class OPTDecoder(nn.Module):
    """Embeddings, the layer stack, the final LayerNorm and project_out (HF's OPTDecoder)."""

    config: OPTConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.word_embed_proj_dim,
            embedding_init=token_embedding_init(cfg),
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
        )
        self.embed_positions = nn.Embed(
            cfg.max_position_embeddings + POSITION_OFFSET,
            cfg.hidden_size,
            embedding_init=normal_init(cfg, (ax.POSITIONS, ax.EMBED)),
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
        )
        if cfg.has_projections:
            self.project_in = dense(
                cfg, cfg.hidden_size, (ax.EMBED_PROJ,), (ax.EMBED,), use_bias=False
            )
            self.project_out = dense(
                cfg, cfg.word_embed_proj_dim, (ax.EMBED,), (ax.EMBED_PROJ,), use_bias=False
            )
        if cfg.has_final_layer_norm:
            self.final_layer_norm = layer_norm(cfg, None)
        layer = OPTDecoderLayer
        if cfg.remat_policy != "none":
            # static_argnums counts `self`: 5 is `deterministic`, 7 and 8 the output flags.
            layer = nn.remat(
                layer,
                static_argnums=(5, 7, 8),
                policy=REMAT_POLICIES[cfg.remat_policy],
                prevent_cse=not cfg.scan_layers,
            )
        if cfg.layer_memory != "device":
            # Each layer's weights reach the accelerator inside the scan, as that layer runs:
            # only one or two layers' weights occupy device memory at a time.
            layer = nn.map_variables(layer, "params", trans_in_fn=_to_device, init=True)
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
            )(cfg, stacked_cache=True)
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
        segment_ids: jax.Array | None = None,
        head_mask: jax.Array | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """The decoder stack.

        Args:
          input_ids: [B, T] token ids, or None when inputs_embeds is given (exactly one).
          attention_mask: [B, T], 1 for real tokens; None means no padding. Or a full mask
            [B, T, T]: which earlier tokens each token attends to, used as given (no causal mask
            is added), for any tree of sequences in a row (several continuations sharing one
            context: evaluation/scoring.py). A token is real if it attends to itself, and its
            position is the number of tokens it attends to, minus one. Without a cache.
          cache: optional KVCache (see kv_cache.py).
          deterministic: False enables dropout ("dropout" rng).
          inputs_embeds: [B, T, P] token embeddings (what `embed_tokens` would give, before
            project_in), as transformers' inputs_embeds.
          position_ids: [B, T] 0-based positions replacing the ones derived from the mask
            (OPT's offset of 2 is added here, as in transformers).
          segment_ids: [B, T] int, several sequences packed into one row: a token attends only
            to earlier tokens of its own segment (equal ids in a contiguous run), and positions
            restart at 0 in each segment. Each packed sequence then gets exactly what it gets
            alone in a row. Without a cache only.
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
            cfg, input_ids, inputs_embeds, attention_mask, cache,
            (position_ids, head_mask, segment_ids),
        )  # fmt: skip
        positions, allowed, key_mask, real = positions_and_mask(
            attention_mask, cache, (batch, length), position_ids, segment_ids
        )
        x = embeddings = self._embed(input_ids, inputs_embeds, positions)  # [B, T, D]
        x, new_cache, probs, hidden = self._layer_stack(
            x, allowed, cache, deterministic, head_mask, (output_attentions, output_hidden_states)
        )
        if cfg.has_final_layer_norm:
            x = self.final_layer_norm(x)
        if cfg.has_projections:
            x = self.project_out(x)  # [B, T, P]

        if cache is not None:
            cache = KVCache(
                key=new_cache[0],
                value=new_cache[1],
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

    def _embed(self, input_ids, inputs_embeds, positions) -> jax.Array:
        """Token (or given) embeddings, project_in, plus learned positions -> [B, T, D]."""
        cfg = self.config
        # OPT has no embedding scale, embedding LayerNorm or embedding dropout.
        if inputs_embeds is None:
            x = self.embed_tokens(input_ids)  # [B, T, P]
        else:
            x = inputs_embeds.astype(cfg.compute_dtype)
        if cfg.has_projections:
            x = self.project_in(x)  # [B, T, D]
        # OPT's learned positions are offset by 2: real tokens start at row 2, padding at 1.
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        return nn.with_logical_constraint(x, (ax.BATCH, ax.LENGTH, ax.EMBED))

    def _layer_stack(self, x, allowed, cache, deterministic, head_mask, flags):
        """Runs the L layers (scanned or unrolled) over x [B, T, D].

        Returns:
          (x [B, T, D], (keys, values) of the updated cache (L-tuples, or [L, ...] arrays when
          scanned; None without a cache), L attention probabilities or Nones, L layer outputs
          or Nones).
        """
        cfg = self.config
        index = None if cache is None else cache.index
        if head_mask is not None and head_mask.ndim == 1:  # one [N] mask for every layer
            head_mask = jnp.broadcast_to(head_mask, (cfg.num_hidden_layers, *head_mask.shape))
        if cfg.scan_layers:
            # The cache is stacked [L, ...]: scanned alongside the stacked parameters, as are the
            # head mask rows and (stacked on the way out) probabilities and layer outputs. The
            # layers return their new keys and values [L, B, N, T, H], written here into the
            # (donated) stacked cache in place. Had the scan stacked each layer's updated cache,
            # the TPU compiler would have kept a second cache-sized array per step.
            layer_caches = None if cache is None else (cache.key, cache.value)
            x, (new_kv, probs, hidden) = self.layers(
                x, allowed, layer_caches, index, deterministic, head_mask, *flags
            )
            if cache is not None:
                layer_caches = tuple(
                    _write_stacked(stack, new, index)
                    for stack, new in zip(layer_caches, new_kv, strict=True)
                )
            probs = None if probs is None else tuple(probs)  # [L, B, N, T, S] -> L-tuple
            hidden = None if hidden is None else tuple(hidden)
            return x, layer_caches, probs, hidden
        keys, values, probs, hidden = [], [], [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.key[i], cache.value[i])
            layer_mask = None if head_mask is None else head_mask[i]
            x, (layer_cache, layer_probs, layer_out) = layer(
                x, allowed, layer_cache, index, deterministic, layer_mask, *flags
            )
            if cache is not None:
                keys.append(layer_cache[0])
                values.append(layer_cache[1])
            probs.append(layer_probs)
            hidden.append(layer_out)
        new_cache = None if cache is None else (tuple(keys), tuple(values))
        return x, new_cache, probs, hidden

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
# (see OPTDecoder.__call__): inputs_embeds, position_ids, segment_ids, head_mask, output_attentions,
# output_hidden_states. The heads pass them through as **inputs.


def _to_device(variables):
    """A layer's variables moved to device memory, their sharding kept (a no-op for those
    already there); one-byte codes stored as words (param_tree.as_words) are unpacked there."""
    return jax.tree.map(lambda x: from_words(jax.device_put(x, jax.memory.Space.Device)), variables)


def _write_stacked(stack: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Writes new [L, B, N, T, H] into the stacked cache [L, B, N, S, H] at each row's slot
    index [B]; one token per row (decoding) row by row.

    Written as one scatter (a vmap of per-row updates), the TPU compiler laid the write out
    differently from the scan's per-layer reads and relaid out the whole cache around it every
    step: a decode step of OPT-13b on a v5e-8 kept 1.0x the cache in temporaries at batch 1
    and 8 (6.7b and 30b at batch 8 too); row by row, 0.001 GiB (tests/test_aot.py).
    """
    if new.shape[3] == 1:
        zero = jnp.zeros((), index.dtype)

        def row(b, stack):
            update = jax.lax.dynamic_slice_in_dim(new, b, 1, axis=1).astype(stack.dtype)
            return jax.lax.dynamic_update_slice(stack, update, (zero, b, zero, index[b], zero))

        written = jax.lax.fori_loop(0, stack.shape[1], row, stack)
    else:  # a prompt or a verify pass: each row's T tokens at once
        written = jax.vmap(lambda layer, update: write_rows(layer, update, index, axis=2))(
            stack, new
        )
    return nn.with_logical_constraint(written, (ax.LAYERS, *KV_AXES))


class OPTModel(nn.Module):
    """The bare decoder (HF's OPTModel); its parameters live under `decoder`."""

    config: OPTConfig

    def setup(self):
        self.decoder = OPTDecoder(self.config)

    def __call__(self, input_ids, attention_mask=None, *, cache=None, deterministic=True, **inputs):
        """input_ids, attention_mask: [B, T] -> ModelOutput (last_hidden_state [B, T, P]).

        inputs: inputs_embeds [B, T, P] instead of input_ids (pass None for those),
        position_ids [B, T], segment_ids [B, T], head_mask [L, N] or [N], output_attentions,
        output_hidden_states; see OPTDecoder.__call__.
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
        score = dense(
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
        qa = dense(cfg, 2, (ax.EMBED_PROJ,), (ax.CLASSES,), use_bias=True, name="qa_outputs")
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


def initializable(module: nn.Module) -> nn.Module:
    """`module` with einsum attention, for `init` on a one-token dummy input: the parameters do
    not depend on the attention kernel, and the TPU flash kernel cannot run a length-1 sequence
    (its tiles are 128 tokens)."""
    config = getattr(module, "config", None)
    if isinstance(config, OPTConfig) and config.attention_impl != EINSUM:
        return module.clone(config=config.replace(attention_impl=EINSUM))
    return module


def init_params(config: OPTConfig, rng: jax.Array | int = 0, module: nn.Module | None = None):
    """Fresh parameters (plain arrays, no partitioning boxes) of `module` (default: the config's
    architecture)."""
    module = initializable(module or model_for(config))
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    variables = jax.jit(module.init)(rng, _dummy_ids())
    return nn.unbox(variables["params"])


def abstract_params(config: OPTConfig, module: nn.Module | None = None):
    """ShapeDtypeStructs of the parameters, with no memory used (`jax.eval_shape`)."""
    if module is None and not config.scan_layers and config.num_hidden_layers > 1:
        # Every decoder layer has the same parameters: trace one (the scanned model's) and name
        # it per layer, rather than trace them all (0.8 s of every 125m checkpoint load).
        return jax.eval_shape(unstack_layers, abstract_params(config.replace(scan_layers=True)))
    module = initializable(module or model_for(config))
    variables = jax.eval_shape(module.init, jax.random.key(0), _dummy_ids())
    return nn.unbox(variables["params"])


def param_logical_axes(config: OPTConfig, module: nn.Module | None = None):
    """The logical axis names (a PartitionSpec of names) of every parameter."""
    module = initializable(module or model_for(config))
    variables = jax.eval_shape(module.init, jax.random.key(0), _dummy_ids())
    return nn.get_partition_spec(variables)["params"]
