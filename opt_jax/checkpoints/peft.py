"""PEFT LoRA adapter directories in and out (adapter_config.json + adapter_model.safetensors).

The files are PEFT's: its key names (`base_model.model.<HF module name>.lora_A.weight`), its
[out, in] layouts and its config fields, so `peft.PeftModel.from_pretrained` loads what
`save_adapter` writes onto the transformers model of the same base, and an adapter trained with
PEFT loads here (`opt_jax.load_pretrained(base_dir, adapter=dir)`). The adapters themselves
(model side: add, split, merge) are opt_jax/lora.py's.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from opt_jax.checkpoints.hf_layout import from_hf_layout, hf_name, hf_shape, to_hf_layout
from opt_jax.config import OPTConfig
from opt_jax.lora import HEADS, split
from opt_jax.model import abstract_params
from opt_jax.param_tree import num_in_axes, stack_layers, unstack_layers

# PEFT's task_type for each architecture.
TASK_TYPES = {
    "OPTForCausalLM": "CAUSAL_LM",
    "OPTForSequenceClassification": "SEQ_CLS",
    "OPTForQuestionAnswering": "QUESTION_ANS",
}
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_KEY = re.compile(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])(?:\.default)?\.weight")


def _module_name(path: tuple[str, ...]) -> str:
    """('model', 'decoder', 'layers_3', 'self_attn', 'q_proj') -> HF's module name."""
    return hf_name(path + ("kernel",))[: -len(".weight")]


def _target_modules(names: list[str]):
    """PEFT's target_modules for exactly these modules: their leaf names when every module of
    that name is adapted (PEFT matches a list by suffix), else a regex of the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return leaves, "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def save_adapter(directory, config: OPTConfig, params, *, base_model: str = "") -> str:
    """Writes a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors,
    PEFT's key names and [out, in] layouts) that `peft.PeftModel.from_pretrained` loads onto
    the transformers model of the same base. Returns the directory."""
    from safetensors.numpy import save_file

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


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
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

    spec = _read_spec(directory)
    tensors = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    config, params, tensors = _load_head(directory, spec, config, params, tensors)
    stacked = config.scan_layers
    base = unstack_layers(params) if stacked else params
    adapted = _adapted_modules(directory, base, tensors)
    r = int(spec["r"])
    new_config = config.replace(
        lora_rank=r,
        lora_alpha=float(spec["lora_alpha"]),
        lora_dropout=float(spec.get("lora_dropout", 0.0)),
        lora_targets=_targets(directory, config, adapted),
        scan_layers=False,
    )
    params = _place(directory, config, base, adapted, tensors, r)
    if stacked:
        new_config = new_config.replace(scan_layers=True)
        params = stack_layers(params, config.num_hidden_layers)
    return new_config, params


def _read_spec(directory) -> dict:
    """adapter_config.json, checked for what we implement."""
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
    return spec


def _adapted_modules(directory, base, tensors: dict) -> dict[str, tuple[str, ...]]:
    """HF module name -> our module path, for every module an adapter tensor names."""
    kernels = {
        _module_name(k[:-1]): k[:-1] for k in traverse_util.flatten_dict(base) if k[-1] == "kernel"
    }
    adapted = {}
    for key in tensors:
        match = _ADAPTER_KEY.fullmatch(key)
        if not match or match.group(1) not in kernels:
            raise ValueError(f"{directory}: tensor {key} names no module of this base model")
        adapted[match.group(1)] = kernels[match.group(1)]
    return adapted


def _targets(directory, config: OPTConfig, adapted: dict) -> tuple[str, ...]:
    """`lora_targets` regexes matching exactly the adapted modules (from the decoder on)."""
    from_decoder = lambda p: p[p.index("decoder") :] if "decoder" in p else p  # noqa: E731
    if not config.scan_layers:
        return tuple(
            f"(^|/){re.escape('/'.join(from_decoder(p)))}$" for p in sorted(adapted.values())
        )
    # One scanned layer stands for all: every layer must be adapted alike.
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
    return tuple(f"/layers/{re.escape('/'.join(m))}$" for m in sorted(next(iter(kinds))))


def _place(directory, config: OPTConfig, base, adapted: dict, tensors: dict, r: int) -> dict:
    """The unrolled base params with each adapted module's lora_A [*in, r] / lora_B [r, *out]
    beside its kernel, every shape checked against the float layer's."""
    flat = traverse_util.flatten_dict(base)
    # The float kernels' [*in, *out] shapes: a quantised base stores its kernels otherwise
    # (int8 [*out, *in], int4 packed), but adapters have the float layer's dimensions.
    float_config = config.replace(quantization="none", lora_rank=0, scan_layers=False)
    float_shapes = traverse_util.flatten_dict(abstract_params(float_config))
    for name, module in adapted.items():
        kernel_shape = float_shapes[module + ("kernel",)].shape
        n_in = num_in_axes(module + ("kernel",))
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
    return traverse_util.unflatten_dict(flat)


def _load_head(directory, spec: dict, config: OPTConfig, params, tensors: dict):
    """Takes a saved task head (modules_to_save) out of `tensors` into the params.

    Returns:
      (config, params, the remaining tensors)
    """
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
