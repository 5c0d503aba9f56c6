"""Whole-model compression: GPTQ and SparseGPT calibrated layer by layer equal their layer steps
on the activations each layer should see (computed here by an independent numpy forward pass,
from the layers before it already compressed); the stored formats (GPTQ's packed codes with zero
points, W8A8) compute what they stand for through the model, generate, scoring and reloading;
SmoothQuant folds exactly and beats naive W8A8 on outlier features; the baselines do what the
papers' baselines do; bad requests fail in one line before any work."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_equal, random_tiny_model
from flax import traverse_util

import opt_jax
from opt_jax import compress
from opt_jax.checkpoints import orbax_io
from opt_jax.compress import formats
from opt_jax.evaluation import score_pairs
from opt_jax.ops.quantized import unpack_codes, w8a8_matmul
from opt_jax.param_tree import stack_layers
from opt_jax.quantization import pack_codes
from opt_jax.serving.engine import Engine, Request

CONFIG, MODEL, PARAMS = random_tiny_model(
    init_std=0.2, noise_seed=7, dropout=0.0, hidden_size=32, ffn_dim=64
)
# 12 sequences of 24 tokens, in passes of 5 (a short last batch).
CALIBRATION = np.random.default_rng(0).integers(3, CONFIG.vocab_size, size=(12, 24))
BATCH = 5
IDS = np.random.default_rng(1).integers(3, CONFIG.vocab_size, size=(3, 10))


def _logits(config, params, ids=IDS):
    return np.asarray(opt_jax.model_for(config).apply({"params": params}, ids).logits)


def _rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------------------------
# An independent numpy forward pass (float64), to know what each Linear should see
# ---------------------------------------------------------------------------------------------
def _np_embed(params, ids):
    decoder = jax.tree.map(lambda a: np.asarray(a, np.float64), params["model"]["decoder"])
    positions = np.arange(ids.shape[1]) + 2  # OPT's offset
    return (
        decoder["embed_tokens"]["embedding"][ids]
        + decoder["embed_positions"]["embedding"][positions]
    )


def _np_layer(layer, x, heads):
    """A pre-LN OPT decoder layer: ({q/k/v, out_proj, fc1, fc2 input: [B, T, in]}, output)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), layer)

    def norm(h, name):
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + 1e-5) * p[name]["scale"] + p[name]["bias"]

    def linear(h, params):
        k = params["kernel"]
        width = h.shape[-1]
        return h @ k.reshape(width, -1) + params["bias"].reshape(-1)

    batch, length, width = x.shape
    h = norm(x, "self_attn_layer_norm")
    attn = p["self_attn"]
    split = lambda a: a.reshape(batch, length, heads, width // heads)  # noqa: E731
    q = split(linear(h, attn["q_proj"])) * (width // heads) ** -0.5
    k, v = split(linear(h, attn["k_proj"])), split(linear(h, attn["v_proj"]))
    scores = np.einsum("btnh,bsnh->bnts", q, k)
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    a = np.einsum("bnts,bsnh->btnh", probs, v).reshape(batch, length, width)
    x = x + linear(a, attn["out_proj"])
    h2 = norm(x, "final_layer_norm")
    f = np.maximum(linear(h2, p["fc1"]), 0)
    out = x + linear(f, p["fc2"])
    return {"qkv": h, "out_proj": a, "fc1": h2, "fc2": f}, out


def _expected_layers(params, compressed_float, layer_step):
    """What each layer's Linears should become: layer_step(W, H) with H from the inputs that
    the compressed layers before it produce (and from the float ones, for contrast)."""
    expected, from_float = [], []
    x_compressed = x_float = _np_embed(params, CALIBRATION)
    decoder = params["model"]["decoder"]
    for i in range(CONFIG.num_hidden_layers):
        layer = decoder[f"layers_{i}"]
        for x, sink in ((x_compressed, expected), (x_float, from_float)):
            inputs, _ = _np_layer(layer, x, CONFIG.num_attention_heads)
            hessians = {}
            for key, value in inputs.items():
                flat = value.reshape(-1, value.shape[-1])
                hessians[key] = 2 * flat.T @ flat / flat.shape[0]
            sink.append(
                {
                    path: np.asarray(
                        layer_step(
                            formats.to_matrix(f["kernel"], path),
                            hessians[compress.calibrate.INPUT_OF[path[-1]]].astype(np.float32),
                        )
                    )
                    for path, f in formats.linears(layer).items()
                }
            )
        x_float = _np_layer(layer, x_float, CONFIG.num_attention_heads)[1]
        x_compressed = _np_layer(
            compressed_float["model"]["decoder"][f"layers_{i}"], x_compressed,
            CONFIG.num_attention_heads,
        )[1]  # fmt: skip
    return expected, from_float


METHODS = {
    "gptq 4-bit g16": (
        lambda: compress.gptq(CONFIG, PARAMS, CALIBRATION, bits=4, group_size=16,
                              batch_size=BATCH),
        lambda W, H: compress.gptq_layer(W, H, bits=4, group_size=16),
    ),
    "gptq 3-bit act_order": (
        lambda: compress.gptq(CONFIG, PARAMS, CALIBRATION, bits=3, group_size=-1,
                              act_order=True, batch_size=BATCH),
        lambda W, H: compress.gptq_layer(W, H, bits=3, act_order=True),
    ),
    "sparsegpt 50%": (
        lambda: compress.sparsegpt(CONFIG, PARAMS, CALIBRATION, 0.5, batch_size=BATCH),
        lambda W, H: compress.sparsegpt_layer(W, H, sparsity=0.5),
    ),
}  # fmt: skip


@pytest.mark.parametrize("method", list(METHODS))
def test_whole_model_equals_the_layer_step_on_the_activations_it_should_see(method):
    run, layer_step = METHODS[method]
    config, params = run()
    float_config, float_params = (
        opt_jax.dequantize(config, params) if config.quantization != "none" else (config, params)
    )
    assert float_config == CONFIG
    expected, from_float = _expected_layers(PARAMS, float_params, layer_step)
    for i, (want, contrast) in enumerate(zip(expected, from_float, strict=True)):
        layer = float_params["model"]["decoder"][f"layers_{i}"]
        for path, fields in formats.linears(layer).items():
            ours = formats.to_matrix(fields["kernel"], path)
            # The numpy Hessian (float64, then float32) and ours (float32 sums) differ in the
            # last bits, which can move a weight across a rounding boundary: compare values.
            close = np.isclose(ours, want[path], rtol=1e-4, atol=1e-5).mean()
            assert close >= 0.995, (i, path, close)  # measured: all of them
            if i > 0:  # layer 1 really saw layer 0's compressed outputs, not its float ones
                contrast_close = np.isclose(ours, contrast[path], rtol=1e-4, atol=1e-5).mean()
                assert contrast_close < 0.97, (i, path, contrast_close)  # measured <= 0.95


# ---------------------------------------------------------------------------------------------
# The stored formats
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_pack_into_bits_per_value_and_unpack(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(48, 3, 5))
    packed = pack_codes(codes, bits)
    assert packed.shape == (48 * bits // 8, 3, 5) and packed.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(unpack_codes(jnp.asarray(packed), bits)), codes)


@pytest.fixture(scope="module")
def gptq_model():
    return compress.gptq(CONFIG, PARAMS, CALIBRATION, bits=3, group_size=16, batch_size=BATCH)


def test_gptq_format_runs_generate_scoring_and_reloads(gptq_model, tmp_path):
    qconfig, qparams = gptq_model
    fc2 = qparams["model"]["decoder"]["layers_0"]["fc2"]
    assert fc2["kernel"].shape == (64 * 3 // 8, 32) and fc2["kernel"].dtype == jnp.uint8
    assert fc2["scale"].shape == fc2["zero"].shape == (64 // 16, 32)
    fconfig, fparams = opt_jax.dequantize(qconfig, qparams)
    np.testing.assert_allclose(_logits(qconfig, qparams), _logits(fconfig, fparams), atol=1e-5)
    mask = np.ones_like(IDS)
    ours = opt_jax.generate(opt_jax.OPTForCausalLM(qconfig), qparams, IDS, mask, max_new_tokens=5)
    ref = opt_jax.generate(opt_jax.OPTForCausalLM(fconfig), fparams, IDS, mask, max_new_tokens=5)
    np.testing.assert_array_equal(ours.sequences, ref.sequences)
    # The serving engine (greedy, the first prompt) continues it as generate does.
    events, done = [], threading.Event()
    engine = Engine(qconfig, qparams, max_batch=2, max_length=32)
    engine.start()
    try:
        emit = lambda choice, event: events.append(event) or ("token" not in event and done.set())  # noqa: E731
        engine.submit(Request([int(t) for t in IDS[0]], 5, emit, temperature=0.0))
        assert done.wait(120)
    finally:
        engine.stop()
    served = [e for e in events if "token" in e]
    assert served
    # Teacher-forced through the model: each token is the argmax (this random model has near
    # ties, so batch shape alone can flip one) with the log-probability the engine reported.
    sequence = np.concatenate([IDS[0], [e["token"] for e in served]])[None]
    logp = np.asarray(jax.nn.log_softmax(_logits(qconfig, qparams, sequence)[0]))
    for t, event in enumerate(served):
        row = logp[IDS.shape[1] - 1 + t]
        assert row[event["token"]] >= row.max() - 1e-5
        assert abs(row[event["token"]] - event["logprob"]) < 1e-4
    pairs = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13])]
    scores = score_pairs(opt_jax.OPTForCausalLM(qconfig), qparams, pairs)
    reference = score_pairs(opt_jax.OPTForCausalLM(fconfig), fparams, pairs)
    np.testing.assert_allclose([s for s, _ in scores], [s for s, _ in reference], rtol=1e-5)
    orbax_io.save_params(tmp_path / "q", qconfig, qparams)
    config, params = opt_jax.load_pretrained(tmp_path / "q")
    assert (config.quantization, config.quant_bits, config.quant_group_size) == ("gptq", 3, 16)
    assert_trees_equal(params, qparams)
    # The packed rows shard with the leading input axis, the grids with the outputs.
    axes = opt_jax.param_logical_axes(qconfig)["model"]["decoder"]["layers_0"]["self_attn"]
    assert tuple(axes["out_proj"]["kernel"]) == ("heads", "embed")
    assert tuple(axes["out_proj"]["zero"]) == (None, "embed")


def test_scanned_models_compress_to_the_same_weights(gptq_model):
    scanned = CONFIG.replace(scan_layers=True)
    sconfig, sparams = compress.gptq(
        scanned, stack_layers(PARAMS, CONFIG.num_hidden_layers), CALIBRATION, bits=3,
        group_size=16, batch_size=BATCH,
    )  # fmt: skip
    qconfig, qparams = gptq_model
    assert sconfig == qconfig.replace(scan_layers=True)
    assert_trees_equal(sparams, stack_layers(qparams, CONFIG.num_hidden_layers))
    np.testing.assert_allclose(_logits(sconfig, sparams), _logits(qconfig, qparams), atol=1e-5)


def test_w8a8_matmul_is_int8_times_int8_with_the_right_scales():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 16)).astype(np.float32)
    x[0, 1, 4] = 40.0  # one outlier: its token's scale is 40 / 127
    q = rng.integers(-127, 128, size=(8, 16)).astype(np.int8)
    scale = rng.uniform(0.01, 0.02, size=8).astype(np.float32)
    rows = x.reshape(-1, 16).astype(np.float64)
    token_scale = np.abs(rows).max(1, keepdims=True) / 127
    expected = (np.round(rows / token_scale) @ q.T.astype(np.float64)) * token_scale * scale
    got = np.asarray(w8a8_matmul(jnp.asarray(x), jnp.asarray(q), jnp.asarray(scale), 1))
    np.testing.assert_allclose(got.reshape(-1, 8), expected, rtol=1e-5, atol=1e-4)
    static = 0.05  # values beyond 127 * 0.05 = 6.35 saturate
    expected = (np.clip(np.round(rows / static), -127, 127) @ q.T.astype(np.float64)) * static
    got = w8a8_matmul(jnp.asarray(x), jnp.asarray(q), jnp.asarray(scale), 1, jnp.float32(static))
    np.testing.assert_allclose(np.asarray(got).reshape(-1, 8), expected * scale, rtol=1e-5,
                               atol=1e-4)  # fmt: skip


def _outlier_model():
    """A model whose residual stream has two huge hidden dimensions (OPT from 6.7B up): after
    the LayerNorms they dominate each token's absmax, so naive per-token int8 activations lose
    the small dimensions (see tests/test_quantization.py)."""
    config, _, params = random_tiny_model(
        init_std=0.05, noise_seed=6, dropout=0.0, hidden_size=128, ffn_dim=128
    )
    flat = traverse_util.flatten_dict(params)
    for name in ("self_attn_layer_norm", "final_layer_norm"):
        for i in range(config.num_hidden_layers):
            key = ("model", "decoder", f"layers_{i}", name, "scale")
            scale = np.array(flat[key])
            scale[[3, 11]] = 40.0  # outlier channels of the LayerNorm outputs
            flat[key] = jnp.asarray(scale)
    return config, traverse_util.unflatten_dict(flat)


def test_smoothquant_folds_exactly_and_beats_naive_w8a8_on_outliers():
    config, params = _outlier_model()
    exact = jax.nn.log_softmax(_logits(config, params))
    errors = {}
    for name, alpha, acts in (("naive", None, "per_token"), ("smooth", 0.5, "per_token"),
                              ("smooth static", 0.5, "static")):  # fmt: skip
        qconfig, qparams = compress.smoothquant(
            config, params, CALIBRATION, alpha, activations=acts, batch_size=BATCH
        )
        assert (qconfig.quantization, qconfig.quant_activations) == ("w8a8", acts)
        errors[name] = float(np.abs(jax.nn.log_softmax(_logits(qconfig, qparams)) - exact).max())
        if name == "smooth":
            # The smoothed float model (weights dequantised, activations not quantised) computes
            # what the original did up to int8 weight rounding: the folding itself is exact.
            _, weight_only = opt_jax.quantize(config, params, "int8")
            weight_error = np.abs(
                jax.nn.log_softmax(_logits(*opt_jax.dequantize(config.replace(
                    quantization="int8"), weight_only))) - exact
            ).max()  # fmt: skip
            folded = jax.nn.log_softmax(_logits(*opt_jax.dequantize(qconfig, qparams)))
            assert np.abs(folded - exact).max() < 3 * weight_error + 1e-4
            layer = qparams["model"]["decoder"]["layers_0"]
            assert float(layer["self_attn_layer_norm"]["scale"][3]) < 40.0 / 2  # moved out
        if acts == "static":
            assert qparams["model"]["decoder"]["layers_0"]["fc2"]["act_scale"].shape == ()
    assert errors["naive"] > 2 * errors["smooth"], errors
    assert errors["naive"] > errors["smooth static"], errors


def test_w8a8_reloads(tmp_path):
    qconfig, qparams = compress.smoothquant(
        CONFIG, PARAMS, CALIBRATION, 0.8, activations="static", batch_size=BATCH
    )
    orbax_io.save_params(tmp_path / "w8a8", qconfig, qparams)
    config, params = opt_jax.load_pretrained(tmp_path / "w8a8")
    assert (config.quantization, config.quant_activations) == ("w8a8", "static")
    assert_trees_equal(params, qparams)
    np.testing.assert_array_equal(_logits(config, params), _logits(qconfig, qparams))


# ---------------------------------------------------------------------------------------------
# Baselines and joint sparsity + quantisation
# ---------------------------------------------------------------------------------------------
def test_baselines_are_the_papers_baselines():
    qconfig, qparams = compress.round_to_nearest(CONFIG, PARAMS, bits=4, group_size=16)
    _, dequantized = opt_jax.dequantize(qconfig, qparams)
    _, pruned = compress.magnitude_prune(CONFIG, PARAMS, 0.5)
    _, two_four = compress.magnitude_prune(CONFIG, PARAMS, prune_n=2, prune_m=4)
    for i in range(CONFIG.num_hidden_layers):
        original = formats.linears(PARAMS["model"]["decoder"][f"layers_{i}"])
        for which, tree in (("rtn", dequantized), ("half", pruned), ("2:4", two_four)):
            for path, fields in formats.linears(tree["model"]["decoder"][f"layers_{i}"]).items():
                W = formats.to_matrix(original[path]["kernel"], path)
                ours = formats.to_matrix(fields["kernel"], path)
                if which == "rtn":
                    np.testing.assert_allclose(ours, compress.rtn(W, 4, 16), rtol=1e-6)
                elif which == "half":  # the smallest half of |W| (inclusive threshold)
                    assert (ours == 0).sum() == W.size // 2 + 1
                    assert np.abs(W[ours == 0]).max() <= np.abs(W[ours != 0]).min()
                else:
                    assert ((ours.reshape(W.shape[0], -1, 4) == 0).sum(-1) == 2).all()


def test_sparsegpt_with_quantisation_stores_the_sparse_grid():
    qconfig, qparams = compress.sparsegpt(
        CONFIG, PARAMS, CALIBRATION, prune_n=2, prune_m=4, bits=4, batch_size=BATCH
    )
    assert (qconfig.quantization, qconfig.quant_bits, qconfig.quant_group_size) == ("gptq", 4, -1)
    _, dequantized = opt_jax.dequantize(qconfig, qparams)
    for path, fields in formats.linears(dequantized["model"]["decoder"]["layers_1"]).items():
        W = formats.to_matrix(fields["kernel"], path)
        assert ((W.reshape(W.shape[0], -1, 4) == 0).sum(-1) >= 2).all()  # 2:4, zeros exact
        assert max(len(np.unique(row)) for row in W) <= 16  # each row on its 4-bit grid


# ---------------------------------------------------------------------------------------------
# Bad requests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: compress.gptq(CONFIG, PARAMS, CALIBRATION, bits=9),
         r"bits must be an integer in \[2, 8\], got 9"),
        (lambda: compress.gptq(CONFIG, PARAMS, CALIBRATION, group_size=24),
         "group_size must be -1 or a positive divisor of the input width 32, got 24"),
        (lambda: compress.gptq(CONFIG, PARAMS, CALIBRATION, group_size=16, act_order=True),
         "act_order with group_size needs static_groups=True"),
        (lambda: compress.sparsegpt(CONFIG, PARAMS, CALIBRATION, 1.5),
         r"sparsity must be in \(0, 1\), got 1.5"),
        (lambda: compress.sparsegpt(CONFIG, PARAMS, CALIBRATION, prune_n=4, prune_m=2),
         "N:M sparsity needs 0 < prune_n < prune_m"),
        (lambda: compress.gptq(CONFIG, PARAMS, CALIBRATION[:, :0], group_size=16),
         "calibration_ids is empty"),
        (lambda: compress.gptq(CONFIG, PARAMS, CALIBRATION[0], group_size=16),
         r"calibration_ids must be a \[batch, length\] array"),
        (lambda: compress.gptq(CONFIG, PARAMS, CALIBRATION + 90, group_size=16),
         r"calibration_ids holds token id \d+ at \[\d+, \d+\], outside the vocabulary \[0, 99\)"),
        (lambda: compress.gptq(CONFIG, PARAMS, np.ones((2, 41), np.int32)),
         "calibration sequences of 41 tokens exceed max_position_embeddings 40"),
        (lambda: compress.smoothquant(CONFIG, PARAMS, CALIBRATION, alpha=1.5),
         r"alpha must be in \[0, 1\]"),
        (lambda: compress.smoothquant(CONFIG.replace(do_layer_norm_before=False), PARAMS,
                                      CALIBRATION), "has none to fold into"),
        (lambda: compress.smoothquant(CONFIG, PARAMS, CALIBRATION, activations="per_channel"),
         "activations must be one of"),
        (lambda: compress.gptq(*opt_jax.quantize(CONFIG, PARAMS, "int8"), CALIBRATION),
         r"already compressed \(quantization='int8'\)"),
        (lambda: compress.magnitude_prune(CONFIG.replace(lora_rank=2), PARAMS),
         "LoRA adapters: merge them first"),
    ],
)  # fmt: skip
def test_bad_requests_fail_in_one_line_before_any_work(call, message):
    with pytest.raises(ValueError, match=message):
        call()
