"""Bad input, half precision, training-mode randomness and logical-axis annotations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ragged_batch

import opt_jax
from opt_jax import layers
from opt_jax import model as model_lib

CONFIG = opt_jax.OPTConfig(
    vocab_size=99,
    hidden_size=16,
    num_hidden_layers=2,
    ffn_dim=37,
    num_attention_heads=4,
    max_position_embeddings=12,
    init_std=0.25,
)


@pytest.fixture(scope="module")
def params():
    return opt_jax.init_params(CONFIG, 0)


def test_sequence_past_position_table_is_an_error(params):
    model = opt_jax.OPTForCausalLM(CONFIG)
    model.apply({"params": params}, np.ones((1, 12), np.int32))  # exactly the table: fine
    with pytest.raises(ValueError, match="sequence length 13 exceeds max_position_embeddings 12"):
        model.apply({"params": params}, np.ones((1, 13), np.int32))
    with pytest.raises(
        ValueError, match=r"attention_mask shape \(1, 3\) does not match input_ids shape \(1, 4\)"
    ):
        model.apply({"params": params}, np.ones((1, 4), np.int32), attention_mask=np.ones((1, 3)))


@pytest.mark.parametrize(
    "ids, message",
    [
        ([[2, 99]], r"token id 99 at \[0, 1\], outside the vocabulary \[0, 99\)"),
        ([[-1, 5]], r"token id -1 at \[0, 0\]"),
        ([[1.5, 2.0]], "must hold integer token ids"),
        ([1, 2, 3], "must be a \\[batch, length\\] array"),
        (np.zeros((2, 0), np.int32), "is empty"),
    ],
)
def test_validate_token_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        opt_jax.validate_token_ids(ids, 99)


def test_validate_returns_int32_and_checks_mask():
    out = opt_jax.validate_token_ids(np.array([[0, 98]], np.int64), 99)
    assert out.dtype == np.int32
    with pytest.raises(ValueError, match="attention_mask shape"):
        opt_jax.validate_token_ids([[1, 2]], 99, attention_mask=[[1]])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_padded_batch_has_no_nan(params, dtype):
    """A row that is almost all padding must not produce NaN (transformers issue 17433)."""
    config = CONFIG.replace(dtype=dtype, param_dtype=dtype)
    half = jax.tree.map(lambda x: x.astype(dtype), params)
    ids, mask = ragged_batch(length=12)
    mask[2, :] = 0
    mask[2, -1] = 1
    out = opt_jax.OPTForCausalLM(config).apply({"params": half}, ids, attention_mask=mask)
    assert out.logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(out.logits)).all()
    ref = opt_jax.OPTForCausalLM(CONFIG).apply({"params": params}, ids, attention_mask=mask).logits
    real = mask == 1
    # Half precision stays close to float32 on the real tokens.
    assert (
        np.abs(np.asarray(out.logits - ref)[real]).max() < 0.1 * np.abs(np.asarray(ref)[real]).max()
    )


def test_dropout_only_in_training_mode(params):
    model = opt_jax.OPTForCausalLM(CONFIG.replace(dropout=0.3, attention_dropout=0.3))
    ids = np.arange(3, 13)[None]
    eval_a = model.apply({"params": params}, ids).logits
    eval_b = model.apply({"params": params}, ids, deterministic=True).logits
    np.testing.assert_array_equal(eval_a, eval_b)
    train = lambda seed: (
        model.apply(  # noqa: E731
            {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(seed)}
        ).logits
    )
    np.testing.assert_array_equal(train(0), train(0))
    assert not np.allclose(train(0), train(1))
    assert not np.allclose(train(0), eval_a)


def test_dropout_masks_drop_at_the_rate_independently_and_rescale():
    """The hashed keep masks (layers.keep_mask) behave as Bernoulli draws: the drop rate is
    `rate` within 5 standard deviations, rows, neighbouring elements and keys are uncorrelated,
    and kept values are scaled by 1 / (1 - rate) so the expectation is unchanged."""
    shape = (32, 128, 256)
    n = np.prod(shape)
    for rate in (0.1, 0.5):
        keep = np.asarray(layers.keep_mask(jax.random.key(0), shape, rate))
        assert abs((1 - keep.mean()) - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    keep = np.asarray(layers.keep_mask(jax.random.key(0), shape, 0.1)).astype(np.float64)
    rows = keep.reshape(shape[0], -1)
    bound = 5 / np.sqrt(rows.shape[1])
    assert np.abs(np.corrcoef(rows) - np.eye(shape[0])).max() < bound
    assert abs(np.corrcoef(keep[..., :-1].ravel(), keep[..., 1:].ravel())[0, 1]) < 5 / np.sqrt(n)
    other = np.asarray(layers.keep_mask(jax.random.key(1), shape, 0.1)).astype(np.float64)
    assert abs(np.corrcoef(keep.ravel(), other.ravel())[0, 1]) < 5 / np.sqrt(n)
    x = jnp.ones(shape)
    out = layers.Dropout(0.1).apply({}, x, False, rngs={"dropout": jax.random.key(0)})
    out = np.asarray(out)
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1 / 0.9, rtol=1e-6)
    assert abs(kept.mean() - 0.9) < 5 * np.sqrt(0.09 / n)
    assert layers.Dropout(1.0).apply({}, x, False).sum() == 0
    assert layers.Dropout(0.1).apply({}, x, True) is x


def test_layerdrop_skips_whole_layers(params):
    """With layerdrop near 1 every layer is skipped: the output is that of a 0-layer model."""
    ids = np.arange(3, 13)[None]
    model = opt_jax.OPTForCausalLM(CONFIG.replace(layerdrop=0.999999, dropout=0.0))
    dropped = model.apply(
        {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(0)}
    )
    # Reference: embeddings + final LayerNorm + tied head, computed by hand.
    dec = params["model"]["decoder"]
    x = (
        dec["embed_tokens"]["embedding"][ids]
        + dec["embed_positions"]["embedding"][np.arange(10) + 2]
    )
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    ln = dec["final_layer_norm"]
    x = (x - mean) / jnp.sqrt(var + 1e-5) * ln["scale"] + ln["bias"]
    np.testing.assert_allclose(dropped.logits, x @ dec["embed_tokens"]["embedding"].T, atol=1e-4)
    kept = model.apply({"params": params}, ids)  # eval mode: layerdrop is off
    assert not np.allclose(kept.logits, dropped.logits)


def test_every_parameter_has_logical_axes():
    for head in ("OPTForCausalLM", "OPTForSequenceClassification", "OPTForQuestionAnswering"):
        config = opt_jax.preset("350m", architecture=head, num_hidden_layers=2)
        axes = jax.tree.leaves(
            opt_jax.param_logical_axes(config),
            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
        )
        shapes = jax.tree.leaves(opt_jax.abstract_params(config))
        assert len(axes) == len(shapes)
        for spec, shape in zip(axes, shapes, strict=True):
            assert len(spec) == len(shape.shape) and all(isinstance(n, str) for n in spec), spec
    names = opt_jax.param_logical_axes(opt_jax.preset("125m", num_hidden_layers=1))
    attn = names["model"]["decoder"]["layers_0"]["self_attn"]
    assert tuple(attn["q_proj"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(attn["out_proj"]["kernel"]) == ("heads", "kv", "embed")


def test_model_for_picks_the_head():
    assert isinstance(opt_jax.model_for(CONFIG), opt_jax.OPTForCausalLM)
    assert isinstance(
        opt_jax.model_for(CONFIG.replace(architecture="OPTForQuestionAnswering")),
        model_lib.OPTForQuestionAnswering,
    )
