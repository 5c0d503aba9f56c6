"""generate(): bad input, compile-once, ragged batches, half precision, contrastive search,
streaming, log-probabilities and the text-level API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ragged_batch, random_tiny_model

import opt_jax
from opt_jax.generation import api


def _tiny(max_positions=64, **overrides):
    return random_tiny_model(
        init_std=0.3, noise_seed=7, max_position_embeddings=max_positions, **overrides
    )


CONFIG, MODEL, PARAMS = _tiny()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(max_new_tokens=60),
            r"prompt length 8 \+ max_new_tokens 60 = 68 exceeds max_position_embeddings 64",
        ),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=4, do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(max_new_tokens=4, do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=4, do_sample=True, typical_p=0.0), r"typical_p must be in \(0, 1\]"),
        (
            dict(max_new_tokens=4, do_sample=True, temperature=0.0),
            "temperature must be > 0 when sampling",
        ),
        (dict(max_new_tokens=4, num_beams=0), "num_beams must be >= 1, got 0"),
        (
            dict(max_new_tokens=4, num_beams=2, num_return_sequences=3),
            r"num_return_sequences \(3\) must be <= num_beams \(2\)",
        ),
        (
            dict(max_new_tokens=4, suppress_tokens=[120]),
            r"token ids \[120\] in the generation options",
        ),
        (dict(max_new_tokens=4, early_stopping="sometimes"), "early_stopping must be"),
    ],
)
def test_bad_options_fail_before_tracing(kwargs, message):
    ids, mask = ragged_batch(length=8)
    before = api.TRACE_COUNT["n"]
    with pytest.raises(ValueError, match=message):
        opt_jax.generate(MODEL, PARAMS, ids, mask, **kwargs)
    assert api.TRACE_COUNT["n"] == before


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        ([[5, 99]], None, r"token id 99 at \[0, 1\], outside the vocabulary \[0, 99\)"),
        ([[5, -3]], None, "token id -3"),
        (np.zeros((1, 0), np.int32), None, "is empty"),
        ([[1, 1], [5, 6]], [[0, 0], [1, 1]], r"prompt rows \[0\] are empty"),
        ([[5, 6]], [[1, 1, 1]], "attention_mask shape"),
        ([[5, 1]], [[1, 0]], "must be left-padded"),
    ],
)
def test_bad_inputs_fail_before_tracing(ids, mask, message):
    before = api.TRACE_COUNT["n"]
    with pytest.raises(ValueError, match=message):
        opt_jax.generate(MODEL, PARAMS, ids, mask, max_new_tokens=3)
    assert api.TRACE_COUNT["n"] == before


def test_same_buckets_trace_and_compile_once():
    config, model, params = _tiny(max_positions=70)  # a config no other test compiles
    before = api.TRACE_COUNT["n"]
    a = opt_jax.generate(model, params, np.arange(3, 8)[None], max_new_tokens=5)
    b = opt_jax.generate(model, params, np.arange(3, 12)[None], max_new_tokens=9)
    assert api.TRACE_COUNT["n"] == before + 1
    assert a.sequences.shape == (1, 10) and b.sequences.shape == (1, 18)
    opt_jax.generate(model, params, np.arange(3, 40)[None], max_new_tokens=5)  # next bucket
    assert api.TRACE_COUNT["n"] == before + 2


def test_kv_cache_overrun_is_rejected():
    cache = opt_jax.KVCache.init(CONFIG, 1, 4)
    out = MODEL.apply({"params": PARAMS}, np.array([[5, 6, 7]]), cache=cache)
    with pytest.raises(ValueError, match=r"cache holds 3 of 4 slots: 2 more tokens do not fit"):
        MODEL.apply({"params": PARAMS}, np.array([[5, 6]]), cache=out.cache)


@pytest.mark.parametrize("strategy", [{}, dict(num_beams=3), dict(penalty_alpha=0.6, top_k=4)])
def test_ragged_batch_equals_rows_alone(strategy):
    ids, mask = ragged_batch(length=8)
    batched = opt_jax.generate(MODEL, PARAMS, ids, mask, max_new_tokens=10, **strategy).sequences
    for row in range(ids.shape[0]):
        real = ids[row][mask[row] == 1][None]
        alone = opt_jax.generate(MODEL, PARAMS, real, max_new_tokens=10, **strategy).sequences
        np.testing.assert_array_equal(batched[row, 8:], alone[0, real.shape[1] :])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_decoding_of_a_mostly_padded_batch(dtype):
    config = CONFIG.replace(dtype=dtype, param_dtype=dtype)
    params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
    ids, mask = ragged_batch(length=12)
    mask[2] = 0
    mask[2, -1] = 1
    out = opt_jax.generate(
        opt_jax.OPTForCausalLM(config), params, ids, mask, max_new_tokens=8, output_logprobs=True
    )
    assert np.isfinite(out.logprobs).all()
    assert ((out.sequences >= 0) & (out.sequences < 99)).all()


@jax.jit
def _full_forward(ids, mask):
    """Logits and final hidden states of right-padded rows [R, W], without a cache (a real
    token sees only the tokens before it, so the padding after it changes nothing)."""
    logits = MODEL.apply({"params": PARAMS}, ids, attention_mask=mask).logits
    decoder = opt_jax.OPTModel(CONFIG)
    hidden = decoder.apply({"params": PARAMS["model"]}, ids, attention_mask=mask)
    return logits, hidden.last_hidden_state


def _right_padded(rows, width=16):
    ids = np.full((len(rows), width), CONFIG.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask


def _numpy_contrastive(prompt, steps, alpha, k):
    """Reference contrastive search: full forward passes, selection in numpy."""
    seq = list(prompt)
    for _ in range(steps):
        logits, hidden = _full_forward(*_right_padded([seq]))
        logits = np.asarray(logits[0, len(seq) - 1], np.float64)
        context = np.asarray(hidden[0, : len(seq)], np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        candidates = np.argsort(-probs, kind="stable")[:k]
        _, hidden = _full_forward(*_right_padded([seq + [int(t)] for t in candidates]))
        scores = []
        for i, token in enumerate(candidates):
            h = np.asarray(hidden[i, len(seq)], np.float64)
            cos = context @ h / (np.linalg.norm(context, axis=1) * np.linalg.norm(h))
            scores.append((1 - alpha) * probs[token] - alpha * cos.max())
        seq.append(int(candidates[int(np.argmax(scores))]))
    return seq[len(prompt) :]


def test_contrastive_search_matches_numpy_reference():
    ids, mask = ragged_batch(length=8)
    out = opt_jax.generate(
        MODEL, PARAMS, ids, mask, max_new_tokens=6, penalty_alpha=0.6, top_k=4, eos_token_id=[]
    )
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row] == 1].tolist()
        assert out.sequences[row, 8:].tolist() == _numpy_contrastive(prompt, 6, 0.6, 4)


def test_logprobs_match_full_forward_and_streaming():
    ids, mask = ragged_batch(length=8)
    streamed = []
    out = opt_jax.generate(
        MODEL,
        PARAMS,
        ids,
        mask,
        max_new_tokens=7,
        output_logprobs=True,
        eos_token_id=[],
        streamer=lambda step, tokens: streamed.append(tokens.copy()),
    )
    np.testing.assert_array_equal(np.stack(streamed, 1), out.sequences[:, 8:])
    full_mask = np.concatenate([mask, np.ones((3, 7), mask.dtype)], 1)
    logits = MODEL.apply({"params": PARAMS}, out.sequences, attention_mask=full_mask).logits
    logp = jax.nn.log_softmax(logits[:, 7:-1], -1)
    expected = jnp.take_along_axis(logp, out.sequences[:, 8:, None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-4)


def test_sampling_seeds_and_return_sequences():
    ids, mask = ragged_batch(length=8)
    kwargs = dict(max_new_tokens=8, do_sample=True, num_return_sequences=3, eos_token_id=[])
    a = opt_jax.generate(MODEL, PARAMS, ids, mask, seed=1, **kwargs).sequences
    b = opt_jax.generate(MODEL, PARAMS, ids, mask, seed=1, **kwargs).sequences
    c = opt_jax.generate(MODEL, PARAMS, ids, mask, prng_key=jax.random.key(2), **kwargs).sequences
    assert a.shape == (9, 16)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(a[0:3, :8], np.repeat(ids[:1], 3, 0))  # prompt as given
    assert len({tuple(r) for r in a[0:3, 8:]}) > 1  # the copies of a row differ


def test_vocab_limit_masks_padded_rows():
    ids, mask = ragged_batch(length=8)
    out = opt_jax.generate(
        MODEL,
        PARAMS,
        ids,
        mask,
        max_new_tokens=12,
        do_sample=True,
        top_k=None,
        vocab_limit=20,
        temperature=3.0,
        eos_token_id=[],
    )
    assert (out.sequences[:, 8:] < 20).all()


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["def add(a, b):\n    return a + b\n\n"] * 20 + ["print('hello world')\n"] * 20
    return opt_jax.train_tokenizer(texts, vocab_size=280)


def test_text_api_and_stop_strings(tokenizer):
    config, model, params = _tiny(max_positions=64)
    config = config.replace(vocab_size=288)
    model = opt_jax.OPTForCausalLM(config)
    params = opt_jax.init_params(config, 3)
    prompts = ["def add(a, b):", "print("]
    sampling = dict(max_new_tokens=10, do_sample=True, seed=0, eos_token_id=[])
    texts = opt_jax.generate_text(model, params, tokenizer, prompts, **sampling)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    ids = tokenizer.encode_batch(prompts)[0]
    out = opt_jax.generate(
        model, params, ids, ids != 1, vocab_limit=tokenizer.vocab_size, **sampling
    )
    assert texts == [tokenizer.decode(r) for r in out.sequences[:, ids.shape[1] :]]
    # A stop string cuts the text; streaming yields the same text piece by piece.
    full = texts[0]
    assert len(full) >= 5, full
    stop = full[3:5]
    cut = opt_jax.generate_text(
        model, params, tokenizer, prompts[:1], stop_strings=[stop], **sampling
    )
    assert cut[0] == full[: full.find(stop)]
    stream = opt_jax.stream_text(
        model, params, tokenizer, prompts[0], stop_strings=[stop], **sampling
    )
    assert "".join(stream) == cut[0]
    assert "".join(opt_jax.stream_text(model, params, tokenizer, prompts[0], **sampling)) == full


@pytest.mark.parametrize(
    "impl",
    [dict(scan_layers=True), dict(attention_impl="dot_product")],
    ids=["scan", "dot_product"],
)
@pytest.mark.parametrize("strategy", [{}, dict(num_beams=3), dict(penalty_alpha=0.6, top_k=4)])
def test_generation_does_not_depend_on_implementation_options(impl, strategy):
    from opt_jax.param_tree import stack_layers

    config = CONFIG.replace(**impl)
    params = stack_layers(PARAMS, CONFIG.num_hidden_layers) if config.scan_layers else PARAMS
    ids, mask = ragged_batch(length=8)
    ref = opt_jax.generate(MODEL, PARAMS, ids, mask, max_new_tokens=8, **strategy).sequences
    out = opt_jax.generate(
        opt_jax.OPTForCausalLM(config), params, ids, mask, max_new_tokens=8, **strategy
    )
    np.testing.assert_array_equal(out.sequences, ref)


def test_concurrent_streams_each_get_their_own_tokens():
    import threading

    prompts = {"a": np.array([[5, 6, 7]]), "b": np.array([[9, 10, 11, 12]])}
    kwargs = dict(max_new_tokens=20, eos_token_id=[])
    expected = {
        name: opt_jax.generate(MODEL, PARAMS, ids, **kwargs).sequences[0, ids.shape[1] :].tolist()
        for name, ids in prompts.items()
    }
    opt_jax.generate(MODEL, PARAMS, prompts["a"], streamer=lambda step, tokens: None, **kwargs)
    both_started = threading.Barrier(2, timeout=30)  # makes the two calls overlap
    streamed = {name: [] for name in prompts}
    results, errors = {}, []

    def run(name):
        def streamer(step, tokens):
            if step == 0:
                both_started.wait()
            streamed[name].append(int(tokens[0]))

        try:
            out = opt_jax.generate(MODEL, PARAMS, prompts[name], streamer=streamer, **kwargs)
            results[name] = out.sequences[0, prompts[name].shape[1] :].tolist()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert expected["a"] != expected["b"]
    for name in prompts:
        assert results[name] == expected[name]
        assert streamed[name] == expected[name], name


def test_streamer_returning_false_stops_generation():
    steps = []

    def streamer(step, tokens):
        steps.append(step)
        return False if step == 2 else None

    out = opt_jax.generate(
        MODEL, PARAMS, np.array([[5, 6, 7]]), max_new_tokens=20, eos_token_id=[], streamer=streamer
    )
    assert steps == [0, 1, 2]
    full = opt_jax.generate(
        MODEL, PARAMS, np.array([[5, 6, 7]]), max_new_tokens=20, eos_token_id=[]
    )
    np.testing.assert_array_equal(out.sequences[0, :6], full.sequences[0, :6])
    assert (out.sequences[0, 6:] == CONFIG.pad_token_id).all()


def _text_model():
    config, _, _ = _tiny(max_positions=64)
    config = config.replace(vocab_size=288)
    return opt_jax.OPTForCausalLM(config), opt_jax.init_params(config, 3)


def test_abandoned_stream_does_not_leak_into_the_next(tokenizer):
    model, params = _text_model()
    options = dict(max_new_tokens=50, eos_token_id=[], do_sample=True, seed=0, temperature=2.0)
    expected = opt_jax.generate_text(model, params, tokenizer, ["print("], **options)[0]
    for _ in opt_jax.stream_text(model, params, tokenizer, "def add(a, b):", **options):
        break  # the user stops reading while its worker thread is still decoding
    second = "".join(opt_jax.stream_text(model, params, tokenizer, "print(", **options))
    assert second == expected


def test_text_api_checks_tokenizer_and_prompt_types(tokenizer):
    model, params = _text_model()
    small = opt_jax.OPTForCausalLM(model.config.replace(vocab_size=200))
    for call in (
        lambda: opt_jax.generate_text(small, params, tokenizer, ["print("], max_new_tokens=2),
        lambda: opt_jax.stream_text(small, params, tokenizer, "print(", max_new_tokens=2),
    ):
        message = rf"tokenizer has {tokenizer.vocab_size} ids .* vocab_size is only 200"
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="stream_text takes one prompt string, got list"):
        opt_jax.stream_text(model, params, tokenizer, ["print("], max_new_tokens=2)


def test_cpu_lm_head_copy_is_cached_and_changes_no_token(monkeypatch):
    """CPU decoding uses a [P, V] copy of the embedding for the LM head: made once per array,
    equal to the transpose, dropped with the array, and generating the same tokens."""
    params = jax.tree.map(jnp.array, PARAMS)  # arrays of our own, so the cache sees them die
    table = params["model"]["decoder"]["embed_tokens"]["embedding"]
    head = api.lm_head_copy(params)
    np.testing.assert_array_equal(head, table.T)
    assert api.lm_head_copy(params) is head  # cached
    assert api.lm_head_copy(jax.tree.map(np.asarray, params)) is None  # not device arrays
    ids, mask = ragged_batch(length=8)
    kwargs = dict(max_new_tokens=10, output_logprobs=True)
    with_copy = opt_jax.generate(MODEL, params, ids, mask, **kwargs)
    monkeypatch.setattr(api, "lm_head_copy", lambda p: None)
    without = opt_jax.generate(MODEL, params, ids, mask, **kwargs)
    np.testing.assert_array_equal(with_copy.sequences, without.sequences)
    np.testing.assert_allclose(with_copy.logprobs, without.logprobs, atol=1e-5)
    monkeypatch.undo()
    key = id(table)
    assert key in api._HEAD_COPIES
    del params, table, head
    import gc

    gc.collect()
    assert key not in api._HEAD_COPIES  # freed with the embedding it was made from


def test_stream_text_refuses_several_continuations(tokenizer):
    model, params = _text_model()
    for options in (dict(do_sample=True, num_return_sequences=2), dict(num_beams=2)):
        with pytest.raises(ValueError, match="stream_text streams one continuation"):
            opt_jax.stream_text(model, params, tokenizer, "print(", max_new_tokens=2, **options)
