"""LoRA adapters (Hu et al. 2021) in PEFT's layout: split / merge, and PEFT adapter directories
in and out.

The model builds adapters itself when `config.lora_rank > 0` (model.Linear: `lora_A` [*in, r]
and `lora_B` [r, *out] beside the kernel of every Linear matched by `config.lora_targets`;
y += (lora_alpha / r) * x A B; a fresh adapter is PEFT's init, B = 0). They are ordinary
leaves of the parameter tree, so `apply`, `generate`, sharding rules (A and B carry their
kernel's logical axes) and scan_layers work unchanged; this module handles them as a set:

    config = config.replace(lora_rank=8, lora_alpha=16)
    params = add_adapters(config, base_params, seed=0)       # PEFT's init
    save_adapter("adapter/", config, params)                 # PEFT layout, PEFT names
    config, params = opt_jax.load_pretrained(base_dir, adapter="adapter/")
    merged_config, merged = merge(config, params)            # plain OPT params, float32 merge
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from opt_jax.config import OPTConfig

LEAVES = ("lora_A", "lora_B")
# Task heads trained in full beside the adapters (PEFT's modules_to_save), by architecture, and
# PEFT's task_type for each.
HEADS = {"OPTForSequenceClassification": "score", "OPTForQuestionAnswering": "qa_outputs"}
TASK_TYPES = {
    "OPTForCausalLM": "CAUSAL_LM",
    "OPTForSequenceClassification": "SEQ_CLS",
    "OPTForQuestionAnswering": "QUESTION_ANS",
}
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_trained(path: tuple[str, ...]) -> bool:
    """Whether LoRA training updates the parameter at `path` (flattened dict keys): the
    adapters, and a task head in full (PEFT's modules_to_save); the rest stays frozen."""
    return path[-1] in LEAVES or path[0] in HEADS.values()


def split(params) -> tuple[dict, dict]:
    """(base params, adapters): the lora_A / lora_B leaves apart from everything else."""
    from opt_jax.training.step import partition

    adapters, base = partition(params, lambda path: path[-1] in LEAVES)
    return base, adapters


def combine(base, adapters) -> dict:
    """The union of a base tree and an adapter tree (split's inverse)."""
    from opt_jax.training.step import merge

    return merge(adapters, base)


def add_adapters(config: OPTConfig, base_params, seed: int = 0) -> dict:
    """base (adapter-free) params + freshly initialised adapters of `config` (PEFT's init)."""
    from opt_jax.model import init_params

    if not config.lora_rank:
        raise ValueError("config.lora_rank is 0: there are no adapters to add")
    _, fresh = split(init_params(config, seed))
    return combine(base_params, fresh)


def _delta(a: jax.Array, b: jax.Array, kernel_ndim: int) -> jax.Array:
    """A [*lead, *in, r] x B [*lead, r, *out] -> [*lead, *in, *out], in float32."""
    lead = a.ndim + b.ndim - kernel_ndim - 2  # stacked layers (scan_layers) lead with [L]
    n_in = a.ndim - lead - 1
    in_shape, out_shape = a.shape[lead : lead + n_in], b.shape[lead + 1 :]
    a2 = a.astype(jnp.float32).reshape(a.shape[:lead] + (-1, a.shape[-1]))
    b2 = b.astype(jnp.float32).reshape(b.shape[: lead + 1] + (-1,))
    return (a2 @ b2).reshape(a.shape[:lead] + in_shape + out_shape)


def merge(config: OPTConfig, params) -> tuple[OPTConfig, dict]:
    """Folds every adapter into its kernel (W + alpha / r * A B, computed in float32): returns
    an adapter-free config and params with the same outputs (dropout aside)."""
    if not config.lora_rank:
        raise ValueError("config.lora_rank is 0: nothing to merge")
    if config.quantization != "none":
        raise ValueError(
            f"the base is quantised ({config.quantization}): adapters cannot be folded into "
            "its integer kernels; keep them unmerged or merge into the float base"
        )
    scale = config.lora_alpha / config.lora_rank
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if k[-1] not in LEAVES}
    for key in [k for k in flat if k[-1] == "lora_A"]:
        module = key[:-1]
        kernel = flat[module + ("kernel",)]
        delta = _delta(flat[key], flat[module + ("lora_B",)], kernel.ndim)
        out[module + ("kernel",)] = (kernel.astype(jnp.float32) + scale * delta).astype(
            kernel.dtype
        )
    return config.replace(lora_rank=0), traverse_util.unflatten_dict(out)


# ---------------------------------------------------------------------------------------------
# PEFT adapter directories
# ---------------------------------------------------------------------------------------------
def _module_name(path: tuple[str, ...]) -> str:
    """('model', 'decoder', 'layers_3', 'self_attn', 'q_proj') -> HF's module name."""
    from opt_jax.checkpoints.hf import hf_name

    return hf_name(path + ("kernel",))[: -len(".weight")]


def _target_modules(names: list[str]):
    """PEFT's target_modules for exactly these modules: their leaf names when every module of
    that name is adapted (PEFT matches a list by suffix), else a regex of the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return leaves, "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def save_adapter(directory, config: OPTConfig, params, *, base_model: str = "") -> str:
    """Writes a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors,
    PEFT's key names and [out, in] layouts) that `peft.PeftModel.from_pretrained` loads onto
    the transformers model of the same base. Returns the directory."""
    from safetensors.numpy import save_file

    from opt_jax.checkpoints.hf import unstack_layers

    if not config.lora_rank:
        raise ValueError("config.lora_rank is 0: the params hold no adapters")
    _, adapters = split(unstack_layers(params) if config.scan_layers else params)
    flat = traverse_util.flatten_dict(adapters)
    tensors, names = {}, []
    for key in sorted(k for k in flat if k[-1] == "lora_A"):
        module = key[:-1]
        name = _module_name(module)
        a = np.asarray(jax.device_get(flat[key]), np.float32)
        b = np.asarray(jax.device_get(flat[module + ("lora_B",)]), np.float32)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(
            a.reshape(-1, a.shape[-1]).T
        )  # [r, in]
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(
            b.reshape(b.shape[0], -1).T
        )  # [out, r]
        names.append(name)
    from opt_jax.checkpoints.hf import hf_name, to_hf_layout

    head = HEADS.get(config.architecture)
    if head is not None and head in params:  # modules_to_save, under PEFT's saved names
        for leaf, value in params[head].items():
            path = (head, leaf)
            value = np.asarray(jax.device_get(value), np.float32)
            tensors[PEFT_PREFIX + hf_name(path)] = to_hf_layout(path, value)
    leaves, pattern = _target_modules(names)
    every = {
        _module_name(k[:-1])
        for k in traverse_util.flatten_dict(split(params)[0])
        if k[-1] == "kernel" and k[-2] in leaves and "layers" in "/".join(k)
    }
    adapter_config = {
        "peft_type": "LORA",
        "task_type": TASK_TYPES.get(config.architecture, "CAUSAL_LM"),
        "base_model_name_or_path": base_model,
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": leaves if every == set(names) else pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": [head] if head is not None and head in params else None,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config, f, indent=2)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS))
    return os.fspath(directory)


def _load_head(directory, spec: dict, config: OPTConfig, params, tensors: dict):
    """Takes a saved task head (modules_to_save) out of `tensors` into the params.

    Returns:
      (config, params, the remaining tensors)
    """
    from opt_jax.checkpoints.hf import from_hf_layout, hf_shape

    saved = set(spec.get("modules_to_save") or ())
    heads = [h for h in HEADS.values() if h in saved and f"{PEFT_PREFIX}{h}.weight" in tensors]
    unknown = sorted(saved - set(HEADS.values()) - {"classifier"})  # PEFT lists both names
    if unknown:
        raise ValueError(f"{directory}: modules_to_save {unknown} are not OPT task heads")
    if not heads:
        return config, params, tensors
    head = heads[0]
    architecture = next(a for a, h in HEADS.items() if h == head)
    weight = tensors.pop(f"{PEFT_PREFIX}{head}.weight")
    bias = tensors.pop(f"{PEFT_PREFIX}{head}.bias", None)
    if config.architecture != architecture:
        params = {"model": params["model"]}
        if architecture == "OPTForSequenceClassification":
            config = config.replace(architecture=architecture, num_labels=int(weight.shape[0]),
                                    id2label=())  # fmt: skip
        else:
            config = config.replace(architecture=architecture)
    params = dict(params)
    out_dim = config.num_labels if head == "score" else 2
    shapes = {"kernel": (config.word_embed_proj_dim, out_dim), "bias": (out_dim,)}
    head_params = {}
    for leaf, value in (("kernel", weight), ("bias", bias)):
        if value is None and head == "score" and leaf == "bias":
            continue  # the classification head has no bias
        want = hf_shape((head, leaf), shapes[leaf])
        if value is None or tuple(value.shape) != want:
            got = "missing" if value is None else tuple(value.shape)
            raise ValueError(
                f"{directory}: {head}.{leaf} is {got}, this base needs {want} "
                "(an adapter for a different base model or number of labels?)"
            )
        head_params[leaf] = jnp.asarray(
            from_hf_layout((head, leaf), value, shapes[leaf]), config.params_dtype
        )
    params[head] = head_params
    return config, params, tensors


def load_adapter(directory, config: OPTConfig, params) -> tuple[OPTConfig, dict]:
    """Adds a PEFT LoRA adapter directory to base (adapter-free) params: returns the config
    with its rank / alpha / targets and the params with its tensors.

    An adapter that carries a task head (PEFT's modules_to_save: `score` for classification,
    `qa_outputs` for QA) turns a language-model base into that head's model, as PEFT does on
    `OPTForSequenceClassification.from_pretrained(base)`; the class names are then LABEL_i.

    Raises:
      ValueError: not a LoRA adapter, an option we do not implement (rsLoRA, DoRA, biases), or
        tensors that do not fit this base (a different model or rank), named.
    """
    from safetensors.numpy import load_file

    from opt_jax.checkpoints.hf import stack_layers, unstack_layers

    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}")
    with open(path) as f:
        spec = json.load(f)
    if spec.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {spec.get('peft_type')!r} is not LORA")
    for option in ("use_rslora", "use_dora"):
        if spec.get(option):
            raise ValueError(f"{path}: {option}=true is not supported")
    if spec.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={spec['bias']!r} is not supported (only 'none')")
    tensors = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    config, params, tensors = _load_head(directory, spec, config, params, tensors)
    stacked = config.scan_layers
    base = unstack_layers(params) if stacked else params
    kernels = {
        _module_name(k[:-1]): k[:-1] for k in traverse_util.flatten_dict(base) if k[-1] == "kernel"
    }
    adapted = {}
    for key in tensors:
        match = re.fullmatch(
            re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])(?:\.default)?\.weight", key
        )
        if not match or match.group(1) not in kernels:
            raise ValueError(f"{directory}: tensor {key} names no module of this base model")
        adapted[match.group(1)] = kernels[match.group(1)]
    r = int(spec["r"])
    from_decoder = lambda p: p[p.index("decoder") :] if "decoder" in p else p  # noqa: E731
    targets = tuple(
        f"(^|/){re.escape('/'.join(from_decoder(p)))}$" for p in sorted(adapted.values())
    )
    if stacked:  # one scanned layer stands for all: every layer must be adapted alike
        per_layer = {}
        for module in adapted.values():
            layer = next(p for p in module if p.startswith("layers_"))
            per_layer.setdefault(layer, set()).add(module[module.index(layer) + 1 :])
        kinds = {frozenset(v) for v in per_layer.values()}
        if len(kinds) != 1 or len(per_layer) != config.num_hidden_layers:
            raise ValueError(
                f"{directory}: the adapter does not adapt every layer alike, which a "
                "scan_layers model cannot hold; load it with scan_layers=False"
            )
        targets = tuple(f"/layers/{re.escape('/'.join(m))}$" for m in sorted(next(iter(kinds))))
    new_config = config.replace(
        lora_rank=r,
        lora_alpha=float(spec["lora_alpha"]),
        lora_dropout=float(spec.get("lora_dropout", 0.0)),
        lora_targets=targets,
        scan_layers=False,
    )
    flat = traverse_util.flatten_dict(base)
    # The float kernels' [*in, *out] shapes: a quantised base stores its kernels otherwise
    # (int8 [*out, *in], int4 packed), but adapters have the float layer's dimensions.
    from opt_jax.model import abstract_params

    float_config = config.replace(quantization="none", lora_rank=0, scan_layers=False)
    float_shapes = traverse_util.flatten_dict(abstract_params(float_config))
    for name, module in adapted.items():
        kernel_shape = float_shapes[module + ("kernel",)].shape
        n_in = 2 if module[-1] == "out_proj" else 1
        in_shape, out_shape = kernel_shape[:n_in], kernel_shape[n_in:]
        a = tensors.get(f"{PEFT_PREFIX}{name}.lora_A.weight")
        b = tensors.get(f"{PEFT_PREFIX}{name}.lora_B.weight")
        want_a, want_b = (r, int(np.prod(in_shape))), (int(np.prod(out_shape)), r)
        for what, value, want in (("lora_A", a, want_a), ("lora_B", b, want_b)):
            if value is None or tuple(value.shape) != want:
                got = "missing" if value is None else tuple(value.shape)
                raise ValueError(
                    f"{directory}: {name}.{what} is {got}, this base with r={r} needs {want} "
                    "(an adapter for a different base model or rank?)"
                )
        kernel_dtype = flat[module + ("kernel",)].dtype  # int8 / uint8 for a quantised base
        dtype = config.params_dtype if config.quantization != "none" else kernel_dtype
        flat[module + ("lora_A",)] = jnp.asarray(a.T.reshape(in_shape + (r,)), dtype)
        flat[module + ("lora_B",)] = jnp.asarray(b.T.reshape((r,) + out_shape), dtype)
    params = traverse_util.unflatten_dict(flat)
    if stacked:
        new_config = new_config.replace(scan_layers=True)
        params = stack_layers(params, config.num_hidden_layers)
    return new_config, params
