"""OPTConfig: presets, HF config.json round trips and validation errors."""

import json
import math

import jax
import pytest
import transformers

import opt_jax
from opt_jax.config import OPTConfig


def _expected_params(cfg: OPTConfig) -> int:
    """Independent closed-form count of OPT's parameters (tied LM head counted once)."""
    d, f, p = cfg.hidden_size, cfg.ffn_dim, cfg.word_embed_proj_dim
    per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * (2 * d)
    total = cfg.vocab_size * p + (cfg.max_position_embeddings + 2) * d
    total += cfg.num_hidden_layers * per_layer
    total += 2 * d if cfg.has_final_layer_norm else 0
    total += 2 * p * d if cfg.has_projections else 0
    return total


@pytest.mark.parametrize("name", opt_jax.PRESETS)
def test_every_preset_builds_abstractly_with_published_size(name):
    cfg = opt_jax.preset(name)
    shapes = opt_jax.abstract_params(cfg)  # jax.eval_shape: no memory
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert count == _expected_params(cfg)
    assert abs(count / opt_jax.PUBLISHED_PARAMS[name] - 1) < 0.025, count


@pytest.mark.parametrize(
    "overrides",
    [{}, {"architecture": "OPTForSequenceClassification", "num_labels": 3}, {"lora_rank": 2},
     {"quantization": "int4", "quant_group_size": 16}, {"word_embed_proj_dim": 16}],
)  # fmt: skip
def test_abstract_params_equal_the_unrolled_models_own_init(overrides):
    """abstract_params traces one (scanned) layer and names it per layer: the same tree as
    tracing the unrolled model's init."""
    import flax.linen as nn

    from opt_jax.model import _dummy_ids, model_for

    cfg = opt_jax.OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=32, **overrides,
    )  # fmt: skip
    init = jax.eval_shape(model_for(cfg).init, jax.random.key(0), _dummy_ids())["params"]
    assert jax.tree.map(lambda x: (x.shape, x.dtype), opt_jax.abstract_params(cfg)) == (
        jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(init))
    )


def test_preset_table_facts():
    assert opt_jax.preset("350m").do_layer_norm_before is False
    assert opt_jax.preset("facebook/opt-350m").word_embed_proj_dim == 512
    assert opt_jax.preset("2.7b").head_dim == 80
    assert opt_jax.preset("175b").num_hidden_layers == 96
    with pytest.raises(ValueError, match="unknown OPT preset '7b'"):
        opt_jax.preset("7b")


def test_hf_round_trip_through_transformers(tmp_path):
    cfg = opt_jax.preset("350m", num_labels=5, activation_function="gelu")
    cfg.save_hf(tmp_path)
    hf = transformers.OPTConfig.from_pretrained(tmp_path)
    assert hf.word_embed_proj_dim == 512 and hf.num_labels == 5 and not hf.do_layer_norm_before
    hf.save_pretrained(tmp_path / "again")
    assert OPTConfig.from_hf(tmp_path / "again") == cfg
    assert OPTConfig.from_hf(cfg.to_hf()) == cfg


def test_hf_defaults_and_readable_names():
    cfg = OPTConfig.from_hf({"model_type": "opt", "_remove_final_layer_norm": True})
    assert cfg.remove_final_layer_norm and not cfg.has_final_layer_norm
    assert cfg.word_embed_proj_dim == cfg.hidden_size == 768
    half = OPTConfig.from_hf({"model_type": "opt", "torch_dtype": "float16"})
    assert half.param_dtype == "float16"
    assert (
        OPTConfig.from_hf({"model_type": "opt", "torch_dtype": "float16"}, dtype="float32").dtype
        == "float32"
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(hidden_size=10, num_attention_heads=3),
            r"hidden_size \(10\) must be divisible by num_attention_heads \(3\)",
        ),
        (dict(activation_function="mish"), "activation_function 'mish' is not supported"),
        (dict(ffn_dim=0), "ffn_dim must be a positive integer, got 0"),
        (dict(num_hidden_layers=-2), "num_hidden_layers must be a positive integer"),
        (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
        (dict(dropout=1.5), r"dropout must be a probability in \[0, 1\)"),
        (
            dict(pad_token_id=500, vocab_size=100),
            r"pad_token_id must be an id in \[0, vocab_size=100\)",
        ),
        (dict(dtype="float64"), "dtype must be one of"),
    ],
)
def test_invalid_configs_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        OPTConfig(**fields)


def test_malformed_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        OPTConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match="is not an OPT config: model_type is 'gpt2'"):
        OPTConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", "hidden_size": -1}))
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        OPTConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "opt", "architectures": ["OPTForTokenClassification"]})
    )
    with pytest.raises(ValueError, match="names no OPT head we implement"):
        OPTConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no OPT config.json"):
        OPTConfig.from_hf(tmp_path / "missing")
