"""The OPT architecture as a frozen dataclass, the public size presets, and HF config.json I/O.

`OPTConfig` holds every field of Hugging Face's `OPTConfig` that changes the math, under the same
names, so a `config.json` maps onto it one to one. Variants come from `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp

# Activations transformers' ACT2FN offers that OPT configs may name, and what each computes.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is the erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}
# The heads we implement, under the class names HF writes into config.json's `architectures`.
ARCHITECTURES = (
    "OPTModel",
    "OPTForCausalLM",
    "OPTForSequenceClassification",
    "OPTForQuestionAnswering",
)
DTYPES = ("float32", "bfloat16", "float16")
# remat_policy -> what a layer's backward pass may keep from its forward ("none": no remat).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = ("einsum", "dot_product", "flash")
LAYER_MEMORIES = ("device", "pinned_host")  # OPTConfig.layer_memory
QUANTIZATIONS = ("none", "int8", "int4", "llm_int8", "gptq", "w8a8")
# W8A8's activation scales: per token at run time, or one per Linear calibrated in advance.
ACTIVATION_QUANTIZATIONS = ("per_token", "static")


# The OPTConfig fields that define the architecture (the function a checkpoint's weights
# compute): a checkpoint and the config it is loaded with must agree on all of them.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "ffn_dim",
    "num_attention_heads",
    "max_position_embeddings",
    "do_layer_norm_before",
    "_remove_final_layer_norm",
    "word_embed_proj_dim",
    "activation_function",
    "enable_bias",
    "layer_norm_elementwise_affine",
)


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """Architecture of an OPT decoder. Defaults are opt-125m (and HF's OPTConfig defaults)."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    # Pre-LN (True, every size but 350m) or post-LN (False, opt-350m).
    do_layer_norm_before: bool = True
    # HF's `_remove_final_layer_norm`: drops the final LayerNorm of pre-LN models (only for
    # checkpoints fine-tuned before transformers 4.20.1). Read it as `remove_final_layer_norm`.
    _remove_final_layer_norm: bool = False
    # Width of the token embedding; != hidden_size adds project_in/out (opt-350m: 512 vs 1024).
    # None means hidden_size, as in HF.
    word_embed_proj_dim: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_function: str = "relu"
    layerdrop: float = 0.0
    init_std: float = 0.02
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    # Outputs of the sequence-classification head (HF derives it from id2label).
    num_labels: int = 2
    # Class names of those outputs, in id order (config.json's id2label); () = LABEL_0, ...
    id2label: tuple[str, ...] = ()
    # Which head a checkpoint holds (config.json's `architectures[0]`).
    architecture: str = "OPTForCausalLM"
    # Compute dtype of activations and matmuls; softmax and logits stay float32.
    dtype: str = "float32"
    # Storage dtype of the parameters.
    param_dtype: str = "float32"
    # -- Implementation choices (not part of HF's config; never change the math) --
    # nn.scan over the layers: compile time independent of depth; params stacked on `layers`.
    scan_layers: bool = False
    # Activation rematerialisation per layer: none | full | save_dots | save_dots_no_batch.
    remat_policy: str = "none"
    # einsum (reference) | dot_product (jax.nn.dot_product_attention: cuDNN flash on GPUs) |
    # flash (Pallas flash attention for TPUs: full-sequence passes such as training; cached
    # decoding keeps einsum).
    attention_impl: str = "einsum"
    # device | pinned_host: where the (scanned, stacked) decoder layers' weights live. With
    # pinned_host they stay in host memory (opt_jax.place_layers puts them there) and each
    # layer's weights move to the accelerator inside the program, one layer at a time, which the
    # compiler overlaps with the previous layer's compute: models larger than HBM decode (the
    # host-memory form of FlexGen's schedule). Needs scan_layers.
    layer_memory: str = "device"
    # LoRA (Hu et al. 2021, PEFT's layout): rank 0 = off. Adapters live beside the kernel of
    # every Linear whose path from the decoder ("decoder/layers_0/self_attn/q_proj") matches
    # one of lora_targets (regular expressions, re.search); y += (alpha / rank) * x A B.
    lora_rank: int = 0
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj$", "v_proj$")
    # Weight-only quantisation of every Linear (quantization.py): none | int8 (per output
    # channel) | int4 (groups of quant_group_size input rows, two values per byte) | llm_int8
    # (LLM.int8(): int8 weights and activations, activation columns above
    # llm_int8_threshold in higher precision). Embeddings and LayerNorms stay unquantised.
    # Formats written by opt_jax.compress: gptq (asymmetric quant_bits-bit codes with a scale
    # and zero point per row and group of quant_group_size input rows, -1 = one group per row:
    # GPTQ's format, also holding RTN and SparseGPT + quantisation) | w8a8 (SmoothQuant: int8
    # weights per output channel and int8 activations, scaled per quant_activations).
    quantization: str = "none"
    quant_group_size: int = 128
    llm_int8_threshold: float = 6.0
    quant_bits: int = 4
    quant_activations: str = "per_token"

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if isinstance(self.lora_targets, (list, str)):  # from JSON, or a single pattern
            targets = (
                [self.lora_targets] if isinstance(self.lora_targets, str) else self.lora_targets
            )
            object.__setattr__(self, "lora_targets", tuple(targets))
        if self.id2label:
            object.__setattr__(self, "id2label", tuple(str(x) for x in self.id2label))
            object.__setattr__(self, "num_labels", len(self.id2label))
        self.validate()

    # -- readable names and derived sizes ---------------------------------------------------
    @property
    def remove_final_layer_norm(self) -> bool:
        return self._remove_final_layer_norm

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_final_layer_norm(self) -> bool:
        # OPT quirk: the final LayerNorm exists only in pre-LN models that did not remove it.
        return self.do_layer_norm_before and not self._remove_final_layer_norm

    @property
    def has_projections(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> OPTConfig:
        return dataclasses.replace(self, **changes)

    # -- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        """Raises ValueError naming the first field that cannot describe an OPT model."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "ffn_dim",
            "num_attention_heads",
            "max_position_embeddings",
            "word_embed_proj_dim",
            "num_labels",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"OPTConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"OPTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("dropout", "attention_dropout", "layerdrop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"OPTConfig.{name} must be a probability in [0, 1), got {value!r}")
        if not isinstance(self.init_std, (int, float)) or self.init_std <= 0:
            raise ValueError(f"OPTConfig.init_std must be positive, got {self.init_std!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"OPTConfig.activation_function {self.activation_function!r} is not supported; "
                f"choose one of {', '.join(ACTIVATIONS)}"
            )
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"OPTConfig.architecture {self.architecture!r} is not one of {ARCHITECTURES}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"OPTConfig.remat_policy {self.remat_policy!r} is not one of "
                f"{tuple(REMAT_POLICIES)}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"OPTConfig.attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}"
            )
        if self.layer_memory not in LAYER_MEMORIES:
            raise ValueError(
                f"OPTConfig.layer_memory {self.layer_memory!r} is not one of {LAYER_MEMORIES}"
            )
        if self.layer_memory != "device" and not self.scan_layers:
            raise ValueError(
                f"OPTConfig.layer_memory {self.layer_memory!r} needs scan_layers=True (the "
                "layers' weights are moved to the device one scanned layer at a time)"
            )
        if (
            isinstance(self.lora_rank, bool)
            or not isinstance(self.lora_rank, int)
            or self.lora_rank < 0
        ):
            raise ValueError(f"OPTConfig.lora_rank must be an integer >= 0, got {self.lora_rank!r}")
        if self.lora_rank and not self.lora_targets:
            raise ValueError("OPTConfig.lora_targets is empty: LoRA would adapt nothing")
        for target in self.lora_targets:
            try:
                re.compile(target)
            except re.error as e:
                raise ValueError(f"OPTConfig.lora_targets: {target!r} is not a regex: {e}") from e
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"OPTConfig.quantization {self.quantization!r} is not one of {QUANTIZATIONS}"
            )
        group = self.quant_group_size
        grouped = self.quantization in ("int4", "gptq")  # the formats with groups read it
        per_row = self.quantization == "gptq" and group == -1
        if grouped and not per_row and (not isinstance(group, int) or group < 2 or group % 2):
            raise ValueError(
                "OPTConfig.quant_group_size must be an even number >= 2 (or -1, one group per "
                f"row, with quantization 'gptq'), got {self.quant_group_size}"
            )
        bits = self.quant_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"OPTConfig.quant_bits must be an integer in [2, 8], got {bits!r}")
        if self.quant_activations not in ACTIVATION_QUANTIZATIONS:
            raise ValueError(
                f"OPTConfig.quant_activations {self.quant_activations!r} is not one of "
                f"{ACTIVATION_QUANTIZATIONS}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"OPTConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}"
                )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 <= value < self.vocab_size
            ):
                raise ValueError(
                    f"OPTConfig.{name} must be an id in [0, vocab_size={self.vocab_size}), "
                    f"got {value!r}"
                )

    # -- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any], **overrides) -> OPTConfig:
        """Reads an HF OPT `config.json` (a directory, the file, or its parsed dict).

        Fields missing from the file take HF's OPTConfig defaults, as transformers does;
        `overrides` (e.g. dtype="bfloat16") replace fields after reading.
        """
        if isinstance(path_or_dict, dict):
            raw, source = dict(path_or_dict), "config dict"
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no OPT config.json at {path}")
            try:
                with open(path) as f:
                    raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
            source = path
        if not isinstance(raw, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type != "opt":
            raise ValueError(
                f"{source} is not an OPT config: model_type is {model_type!r}, expected 'opt'"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {
            k: v
            for k, v in raw.items()
            if k in fields and k not in ("dtype", "architecture", "id2label")
        }
        if "id2label" in raw and isinstance(raw["id2label"], dict):
            names = _label_names(raw["id2label"], source)
            kwargs["num_labels"] = len(names)
            if names != tuple(f"LABEL_{i}" for i in range(len(names))):
                kwargs["id2label"] = names
        elif "num_labels" in raw:
            kwargs["num_labels"] = raw["num_labels"]
        archs = raw.get("architectures") or ["OPTForCausalLM"]
        if not isinstance(archs, list) or not archs or archs[0] not in ARCHITECTURES:
            raise ValueError(f"{source}: architectures {archs!r} names no OPT head we implement")
        kwargs["architecture"] = archs[0]
        quant = raw.get("opt_jax_quantization")
        if isinstance(quant, dict):
            kwargs.update(
                quantization=quant["method"],
                quant_group_size=quant["group_size"],
                llm_int8_threshold=quant["threshold"],
                quant_bits=quant.get("bits", 4),
                quant_activations=quant.get("activations", "per_token"),
            )
        lora = raw.get("opt_jax_lora")
        if isinstance(lora, dict):
            kwargs.update(
                lora_rank=lora["rank"],
                lora_alpha=lora["alpha"],
                lora_dropout=lora.get("dropout", 0.0),
                lora_targets=lora["targets"],
            )
        stored = raw.get("dtype", raw.get("torch_dtype"))
        if stored in DTYPES:
            kwargs["param_dtype"] = stored
            # Half-precision checkpoints compute in their own dtype unless overridden.
            kwargs["dtype"] = stored
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from e

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers' OPTConfig reads back to the same model."""
        out = {
            "model_type": "opt",
            "architectures": [self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "ffn_dim": self.ffn_dim,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "do_layer_norm_before": self.do_layer_norm_before,
            "_remove_final_layer_norm": self._remove_final_layer_norm,
            "word_embed_proj_dim": self.word_embed_proj_dim,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "activation_function": self.activation_function,
            "layerdrop": self.layerdrop,
            "init_std": self.init_std,
            "enable_bias": self.enable_bias,
            "layer_norm_elementwise_affine": self.layer_norm_elementwise_affine,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "id2label": {str(i): name for i, name in enumerate(self.label_names)},
            "label2id": {name: i for i, name in enumerate(self.label_names)},
            "tie_word_embeddings": True,
            "use_cache": True,
            "dtype": self.param_dtype,
        }
        if self.quantization != "none":  # ours only: the stored weights are quantised
            out["opt_jax_quantization"] = {
                "method": self.quantization, "group_size": self.quant_group_size,
                "threshold": self.llm_int8_threshold, "bits": self.quant_bits,
                "activations": self.quant_activations,
            }  # fmt: skip
        if self.lora_rank:  # ours only (transformers ignores it): the adapters' shapes
            out["opt_jax_lora"] = {
                "rank": self.lora_rank, "alpha": self.lora_alpha,
                "dropout": self.lora_dropout, "targets": list(self.lora_targets),
            }  # fmt: skip
        return out

    @property
    def label_names(self) -> tuple[str, ...]:
        """The classification head's class names in id order (HF's LABEL_i when unnamed)."""
        return self.id2label or tuple(f"LABEL_{i}" for i in range(self.num_labels))

    def save_hf(self, directory: str | os.PathLike) -> str:
        """Writes `config.json` into `directory` and returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        with open(path, "w") as f:
            json.dump(self.to_hf(), f, indent=2, sort_keys=True)
        return path


def _label_names(id2label: dict, source: str) -> tuple[str, ...]:
    """config.json's id2label ({"0": name, ...}) as names in id order."""
    try:
        ids = sorted(int(k) for k in id2label)
    except ValueError as e:
        raise ValueError(f"{source}: id2label keys must be integers, got {list(id2label)}") from e
    if ids != list(range(len(ids))):
        raise ValueError(f"{source}: id2label keys must be 0..{len(ids) - 1}, got {ids}")
    by_id = {int(k): str(v) for k, v in id2label.items()}
    return tuple(by_id[i] for i in ids)


# The public sizes. Sources: the OPT paper (Zhang et al. 2022, arXiv:2205.01068, Table 1),
# the facebook/opt-* config.json files on the Hugging Face hub and metaseq's
# opt_job_constants.py (175b, which is not on the hub). All share vocab 50272, 2048 positions,
# relu, ffn = 4 x hidden; only 350m is post-LN with a 512-wide embedding.
#   name:  (layers, hidden, heads, word_embed_proj_dim, do_layer_norm_before, published params)
_PRESET_TABLE = {
    "125m": (12, 768, 12, 768, True, 125e6),
    "350m": (24, 1024, 16, 512, False, 331e6),  # hub lists 331M: the 512-wide embedding
    "1.3b": (24, 2048, 32, 2048, True, 1.3e9),
    "2.7b": (32, 2560, 32, 2560, True, 2.7e9),
    "6.7b": (32, 4096, 32, 4096, True, 6.7e9),
    "13b": (40, 5120, 40, 5120, True, 13e9),
    "30b": (48, 7168, 56, 7168, True, 30e9),
    "66b": (64, 9216, 72, 9216, True, 66e9),
    "175b": (96, 12288, 96, 12288, True, 175e9),
}
PRESETS = tuple(_PRESET_TABLE)
PUBLISHED_PARAMS = {name: row[-1] for name, row in _PRESET_TABLE.items()}


def preset(name: str, **overrides) -> OPTConfig:
    """The OPTConfig of a public size ("125m", "opt-350m", "facebook/opt-1.3b" all work)."""
    key = name.lower().removeprefix("facebook/").removeprefix("opt-").removeprefix("opt_")
    if key not in _PRESET_TABLE:
        raise ValueError(f"unknown OPT preset {name!r}; choose one of {', '.join(PRESETS)}")
    layers, hidden, heads, proj, pre_ln, _ = _PRESET_TABLE[key]
    fields = dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        ffn_dim=4 * hidden,
        num_attention_heads=heads,
        word_embed_proj_dim=proj,
        do_layer_norm_before=pre_ln,
    )
    fields.update(overrides)
    return OPTConfig(**fields)
