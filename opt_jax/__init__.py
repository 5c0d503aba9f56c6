"""opt_jax: Meta's OPT decoder language models in JAX/Flax, exactly matching transformers."""

from opt_jax.config import PRESETS, PUBLISHED_PARAMS, OPTConfig, preset
from opt_jax.convert import CheckpointError, hf_state_dict, load_pretrained, save_pretrained
from opt_jax.decoding import GenerateOutput, GenerationConfig, generate
from opt_jax.kv_cache import KVCache
from opt_jax.losses import causal_lm_loss
from opt_jax.metaseq import load_metaseq
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
from opt_jax.text import generate_text, stream_text
from opt_jax.tokenizer import OPTTokenizer, train_tokenizer
from opt_jax.validation import validate_token_ids

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "PUBLISHED_PARAMS",
    "CausalLMOutput",
    "GenerateOutput",
    "GenerationConfig",
    "CheckpointError",
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
    "generate",
    "generate_text",
    "hf_state_dict",
    "init_params",
    "load_metaseq",
    "load_pretrained",
    "model_for",
    "param_logical_axes",
    "preset",
    "save_pretrained",
    "stream_text",
    "train_tokenizer",
    "validate_token_ids",
]
