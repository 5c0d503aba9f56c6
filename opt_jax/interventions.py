"""Looking inside OPT: capture any named intermediate, patch activations, the logit lens and head
ablation, on Flax's own method interception (`nn.intercept_methods`), not a fork of the model.

Sites are named `layers_{i}.{site}` (i from 0), with site one of:

  attn_input    [B, T, D]     what self-attention reads (after the LayerNorm in pre-LN models)
  q, k, v       [B, T, N, H]  the projections (q already scaled by head_dim ** -0.5, as in HF)
  head_outputs  [B, T, N, H]  each head's attention output, before out_proj mixes the heads
  attn_output   [B, T, D]     out_proj's output (before dropout and the residual add)
  mlp_hidden    [B, T, F]     the MLP's activations (fc2's input)
  mlp_output    [B, T, D]     fc2's output
  residual      [B, T, D]     the layer's output: the residual stream after layer i

Everything here runs the model's own modules: with no patches, outputs are bitwise the model's.
Models with `scan_layers=True` are run in the per-layer layout (parameters unstacked), since a
scanned layer is one traced function for all layers.

    out, acts = capture(model, params, ids, mask, names=["layers_3.residual", "layers_3.q"])
    out = patch(model, params, ids, mask, {"layers_3.residual": (stored, positions)})
    lens = logit_lens(model, params, ids, mask)          # [L, B, T, V]
    out = ablate_heads(model, params, ids, mask, [(2, 5)], mode="mean")
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from opt_jax.model import OPTForCausalLM
from opt_jax.param_tree import unstack_layers

# site -> (module path below the layer, "input" or "output" of that module's __call__)
SITES = {
    "attn_input": (("self_attn",), "input"),
    "q": (("self_attn", "q_proj"), "output"),
    "k": (("self_attn", "k_proj"), "output"),
    "v": (("self_attn", "v_proj"), "output"),
    "head_outputs": (("self_attn", "out_proj"), "input"),
    "attn_output": (("self_attn", "out_proj"), "output"),
    "mlp_hidden": (("fc2",), "input"),
    "mlp_output": (("fc2",), "output"),
    "residual": ((), "output"),
}
_NAME = re.compile(r"^layers_(\d+)\.(\w+)$")


def _parse(config, names: Iterable[str]) -> dict[tuple, str]:
    """{(layer, module path, "input"/"output"): name} for site names; bad names are errors."""
    where = {}
    for name in names:
        match = _NAME.match(name)
        if not match or match.group(2) not in SITES:
            raise ValueError(
                f"unknown site {name!r}: sites are 'layers_<i>.<site>' with site one of "
                f"{', '.join(SITES)}"
            )
        layer = int(match.group(1))
        if layer >= config.num_hidden_layers:
            raise ValueError(f"{name}: the model has layers 0 .. {config.num_hidden_layers - 1}")
        path, kind = SITES[match.group(2)]
        where[(layer, path, kind)] = name
    return where


def _locate(module) -> tuple[int, tuple[str, ...]] | None:
    """(layer index, path below the layer) of a module inside the decoder stack, else None."""
    path = module.path
    for i, part in enumerate(path):
        match = re.fullmatch(r"layers_(\d+)", part)
        if match:
            return int(match.group(1)), tuple(path[i + 1 :])
    return None


def _first(value):
    """The activation in a module's result (a layer returns (x, extras), attention (out, ...))."""
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, new):
    return (new, *value[1:]) if isinstance(value, tuple) else new


def _run(model, params, input_ids, attention_mask, inputs, on_site):
    """Applies the model with `on_site(name, value) -> value` called at every site named in
    `on_site.sites` ({(layer, path, kind): name}, see _parse)."""
    config = model.config
    if config.scan_layers:  # intercept per layer: run the unrolled layout of the same weights
        config = config.replace(scan_layers=False)
        model, params = type(model)(config), unstack_layers(params)
    sites = on_site.sites

    def interceptor(next_fun, args, kwargs, context):
        where = _locate(context.module) if context.method_name == "__call__" else None
        if where is None:
            return next_fun(*args, **kwargs)
        layer, path = where
        name = sites.get((layer, path, "input"))
        if name is not None:
            args = (on_site(name, args[0]), *args[1:])
        result = next_fun(*args, **kwargs)
        name = sites.get((layer, path, "output"))
        if name is not None:
            result = _replace_first(result, on_site(name, _first(result)))
        return result

    with nn.intercept_methods(interceptor):
        return model.apply({"params": nn.unbox(params)}, input_ids, attention_mask, **inputs)


class _Recorder:
    """on_site callable that stores every value it sees."""

    def __init__(self, sites):
        self.sites, self.values = sites, {}

    def __call__(self, name, value):
        self.values[name] = value
        return value


class _Patcher(_Recorder):
    """on_site callable that replaces values by stored ones at chosen positions."""

    def __init__(self, sites, patches):
        super().__init__(sites)
        self.patches = patches

    def __call__(self, name, value):
        stored, positions = self.patches[name]
        stored = jnp.asarray(stored, value.dtype)
        if stored.shape != value.shape:
            raise ValueError(
                f"patch {name}: value shape {stored.shape} != the site's {value.shape}"
            )
        if positions is None:
            return stored
        where = jnp.asarray(positions)
        if where.dtype != bool:  # token indices -> a [T] mask
            where = jnp.zeros(value.shape[1], bool).at[where].set(True)
        if where.ndim == 1:
            where = jnp.broadcast_to(where, value.shape[:2])
        where = where.reshape(where.shape + (1,) * (value.ndim - 2))  # [B, T, 1, ...]
        return jnp.where(where, stored, value)


def capture(model, params, input_ids, attention_mask=None, *, names: Sequence[str], **inputs):
    """Runs the model and returns (its output, {name: activation}) for the named sites.

    Args:
      model: any opt_jax head (OPTForCausalLM, ...). params: its parameters.
      input_ids, attention_mask: [B, T], as for `model.apply`.
      names: sites, e.g. ["layers_0.q", "layers_5.residual"] (see the module docstring).
      inputs: other forward inputs (inputs_embeds, position_ids, head_mask, ...).
    """
    recorder = _Recorder(_parse(model.config, names))
    out = _run(model, params, input_ids, attention_mask, inputs, recorder)
    return out, {name: recorder.values[name] for name in names}


def patch(model, params, input_ids, attention_mask=None, patches: Mapping | None = None, **inputs):
    """Runs the model with activations replaced (activation patching).

    Args:
      patches: {site name: (stored value of the site's full shape, positions)}. positions is
        None (everywhere), a [T] or [B, T] bool mask, or a list of token indices; only there is
        the site's value replaced by the stored one. Later layers see the patched value.
    """
    patches = dict(patches or {})
    patcher = _Patcher(_parse(model.config, patches), patches)
    return _run(model, params, input_ids, attention_mask, inputs, patcher)


def logit_lens(model, params, input_ids, attention_mask=None, **inputs) -> jax.Array:
    """[L, B, T, V] float32: every layer's residual stream read out as the last one is (final
    LayerNorm, project_out, tied LM head; nostalgebraist 2020). The last entry equals the
    model's logits."""
    if not isinstance(model, OPTForCausalLM):
        raise ValueError(
            "the logit lens reads out through the LM head: pass an OPTForCausalLM, got "
            f"{type(model).__name__}"
        )
    names = [f"layers_{i}.residual" for i in range(model.config.num_hidden_layers)]
    _, acts = capture(model, params, input_ids, attention_mask, names=names, **inputs)
    base = model.config.replace(scan_layers=False)
    plain = params
    if model.config.scan_layers:
        plain = unstack_layers(params)
    readout = OPTForCausalLM(base)
    return jnp.stack(
        [readout.apply({"params": nn.unbox(plain)}, acts[n], method="readout") for n in names]
    )


def head_mask_for(config, heads: Iterable[tuple[int, int]]) -> np.ndarray:
    """[L, N] float32 head mask with 0 at the (layer, head) pairs given, 1 elsewhere."""
    mask = np.ones((config.num_hidden_layers, config.num_attention_heads), np.float32)
    for layer, head in heads:
        if not (0 <= layer < mask.shape[0] and 0 <= head < mask.shape[1]):
            raise ValueError(f"head ({layer}, {head}) is outside the model's {mask.shape} heads")
        mask[layer, head] = 0.0
    return mask


def ablate_heads(
    model,
    params,
    input_ids,
    attention_mask=None,
    heads: Sequence[tuple[int, int]] = (),
    *,
    mode: str = "zero",
    reference: tuple | None = None,
    **inputs,
):
    """Runs the model with attention heads ablated.

    Args:
      heads: (layer, head) pairs.
      mode: "zero" multiplies their attention probabilities by 0 (head_mask); "mean" replaces
        each head's output by its mean over the real tokens of `reference` ((ids, mask);
        default: these inputs), the usual mean ablation.
    """
    if mode == "zero":
        mask = head_mask_for(model.config, heads)
        return model.apply(
            {"params": nn.unbox(params)}, input_ids, attention_mask, head_mask=mask, **inputs
        )
    if mode != "mean":
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    head_mask_for(model.config, heads)  # checks the pairs
    ref_ids, ref_mask = reference if reference is not None else (input_ids, attention_mask)
    names = {layer: f"layers_{layer}.head_outputs" for layer, _ in heads}
    _, acts = capture(model, params, ref_ids, ref_mask, names=sorted(set(names.values())))
    real = np.ones(np.shape(ref_ids), bool) if ref_mask is None else np.asarray(ref_mask, bool)
    means = {name: acts[name][real].mean(axis=0) for name in acts}  # [N, H] over real tokens

    def ablate(name, value):  # value: [B, T, N, H] as this run computed it
        layer = int(_NAME.match(name).group(1))
        for head in [h for lyr, h in heads if lyr == layer]:
            value = value.at[:, :, head].set(means[name][head].astype(value.dtype))
        return value

    ablate.sites = _parse(model.config, means)
    return _run(model, params, input_ids, attention_mask, inputs, ablate)
