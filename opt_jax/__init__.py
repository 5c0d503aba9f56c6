"""opt_jax: Meta's OPT decoder language models in JAX/Flax, exactly matching transformers.

Layout, bottom to top (a module imports only from the layers below it):
- config.py, param_tree.py (the parameter tree's shared operations), parallel/ (logical axes,
  meshes, multi-host start-up), tokenizer.py, validation.py, losses.py;
- ops/ (attention kernels, quantised matmuls), kv_cache.py, layers.py, model.py: the model;
- generation/ (decoding), quantization.py and lora.py (transforms of a model's parameters);
- checkpoints/ (HF names and layouts, HF / metaseq / orbax / PEFT files), planning/ (memory
  plans, speed bounds), evaluation/, interventions.py;
- training/ (the loop, objectives, data, experiment configs), tasks/, serving/, sweeps.py.
The public API is re-exported here.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from opt_jax import compress, data
from opt_jax.checkpoints.hf import CheckpointError, hf_state_dict, load_pretrained, save_pretrained
from opt_jax.checkpoints.metaseq import load_metaseq
from opt_jax.checkpoints.peft import save_adapter
from opt_jax.config import PRESETS, PUBLISHED_PARAMS, OPTConfig, preset
from opt_jax.generation import (
    GenerateOutput,
    GenerationConfig,
    generate,
    generate_text,
    stream_text,
)
from opt_jax.kv_cache import KVCache
from opt_jax.losses import causal_lm_loss
from opt_jax.model import (
    CausalLMOutput,
    ModelOutput,
    OPTForCausalLM,
    OPTForQuestionAnswering,
    OPTForSequenceClassification,
    OPTModel,
    QuestionAnsweringOutput,
    SequenceClassifierOutput,
    abstract_params,
    init_params,
    model_for,
    param_logical_axes,
)
from opt_jax.param_tree import place_layers
from opt_jax.quantization import dequantize, quantize
from opt_jax.tokenizer import IncrementalDecoder, OPTTokenizer, train_tokenizer
from opt_jax.validation import validate_token_ids

__version__ = "0.1.0"

# Module paths of the flat 0.1 layout, still importable (with a DeprecationWarning naming the
# new home) so that code written against them keeps working.
_MOVED_MODULES = {
    "decoding": "opt_jax.generation",
    "beam_search": "opt_jax.generation.beam_search",
    "logits_processing": "opt_jax.generation.processors",
    "text": "opt_jax.generation.text",
    "train": "opt_jax.training.train",
    "train_config": "opt_jax.training.experiment",
    "metrics": "opt_jax.training.metrics",
    "convert": "opt_jax.checkpoints.hf",
    "torch_reader": "opt_jax.checkpoints.torch_reader",
    "metaseq": "opt_jax.checkpoints.metaseq",
    "checkpoint": "opt_jax.checkpoints.orbax_io",
    "sharding": "opt_jax.parallel.sharding",
    "distributed": "opt_jax.parallel.distributed",
    "memory": "opt_jax.planning.memory",
    "roofline": "opt_jax.planning.roofline",
    # Moved in 0.2 (one-way layering: planning sits above the model, parallel/ below it).
    "parallel.memory": "opt_jax.planning.memory",
    "parallel.roofline": "opt_jax.planning.roofline",
    "training.tasks": "opt_jax.training.objectives",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves `opt_jax.<old name>` to the module's new home."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix == __name__ and name in _MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = _MOVED_MODULES[spec.name.partition(".")[2]]
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3
        )
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


sys.meta_path.append(_MovedModuleFinder())

__all__ = [
    "PRESETS",
    "PUBLISHED_PARAMS",
    "compress",
    "data",
    "CausalLMOutput",
    "GenerateOutput",
    "GenerationConfig",
    "CheckpointError",
    "IncrementalDecoder",
    "KVCache",
    "ModelOutput",
    "OPTConfig",
    "OPTForCausalLM",
    "OPTForQuestionAnswering",
    "OPTForSequenceClassification",
    "OPTModel",
    "OPTTokenizer",
    "QuestionAnsweringOutput",
    "SequenceClassifierOutput",
    "abstract_params",
    "causal_lm_loss",
    "dequantize",
    "generate",
    "generate_text",
    "hf_state_dict",
    "init_params",
    "load_metaseq",
    "load_pretrained",
    "model_for",
    "param_logical_axes",
    "place_layers",
    "preset",
    "quantize",
    "save_adapter",
    "save_pretrained",
    "stream_text",
    "train_tokenizer",
    "validate_token_ids",
]


def __getattr__(name):  # `opt_jax.decoding` etc. without an import, as in 0.1
    if name in _MOVED_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
