"""generate()'s option checks: every bad option or combination raises a ValueError that names it
before anything is traced; what transformers accepts (numpy integers, penalty_alpha=0) still runs;
beam sampling keeps transformers' min_tokens_to_keep."""

import numpy as np
import pytest
from conftest import ragged_batch, random_tiny_model

import opt_jax
from opt_jax.generation import api

CONFIG, MODEL, PARAMS = random_tiny_model(init_std=0.3, noise_seed=7, max_position_embeddings=64)
V = CONFIG.vocab_size  # 99


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(num_beams=2, output_logprobs=True),
            "output_logprobs=True is not available with num_beams > 1",
        ),
        (dict(vocab_limit=0), r"vocab_limit must be > 0 and > the EOS and pad ids .* got 0"),
        (dict(vocab_limit=-5), "vocab_limit must be > 0"),
        (dict(vocab_limit=2), r"vocab_limit must be .* \(largest 2\).* got 2"),  # EOS is 2
        (dict(vocab_limit=30, eos_token_id=40), r"\(largest 40\)"),
        (dict(vocab_limit=20.0), "vocab_limit must be an integer, got 20.0"),
        (
            dict(penalty_alpha=0.6, top_k=2000),
            r"top_k \(2000\) must be <= the vocabulary size \(99\) in contrastive search",
        ),
        (dict(top_k=2.5, do_sample=True), "top_k must be an integer, got 2.5"),
        (dict(num_beams=2.5), "num_beams must be an integer, got 2.5"),
        (dict(num_beams=True), "num_beams must be an integer, got True"),
        (
            dict(num_return_sequences=2.0, do_sample=True),
            "num_return_sequences must be an integer, got 2.0",
        ),
        (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size must be an integer"),
        (dict(min_new_tokens=1.5), "min_new_tokens must be an integer"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be a positive integer, got 2.5"),
        (dict(max_new_tokens=True), "max_new_tokens must be a positive integer, got True"),
        (dict(bad_words_ids=[5, 6]), r"bad_words_ids expects a list of token-id lists"),
        (dict(stop_sequences=[5, 6]), r"stop_sequences expects a list of token-id lists"),
        (dict(stop_sequences=["ab"]), r"stop_sequences expects a list of token-id lists"),
        (dict(bad_words_ids=[[5.5]]), r"bad_words_ids token id must be an integer, got 5.5"),
        (
            dict(min_new_tokens=5, max_new_tokens=4),
            r"min_new_tokens \(5\) must be <= max_new_tokens \(4\)",
        ),
        (
            dict(penalty_alpha=0.6, top_k=4, do_sample=True),
            "penalty_alpha selects contrastive search, which is greedy.*do_sample=True",
        ),
        (
            dict(penalty_alpha=0.6, top_k=4, num_beams=2),
            "penalty_alpha selects contrastive search, which is greedy.*num_beams=2",
        ),
        (dict(penalty_alpha=0.6, top_k=None), r"needs top_k >= 2 candidates, got top_k=None"),
        (dict(penalty_alpha=0.6, top_k=0), r"needs top_k >= 2 candidates, got top_k=0"),
        (dict(penalty_alpha=0.6, top_k=1), r"needs top_k >= 2 candidates, got top_k=1"),
    ],
)
def test_bad_option_types_and_combinations_fail_before_tracing(kwargs, message):
    ids, mask = ragged_batch(length=8)
    kwargs = dict(dict(max_new_tokens=4), **kwargs)
    before = api.TRACE_COUNT["n"]
    with pytest.raises(ValueError, match=message):
        opt_jax.generate(MODEL, PARAMS, ids, mask, **kwargs)
    assert api.TRACE_COUNT["n"] == before


def test_numpy_integers_and_accepted_combinations_run():
    ids, mask = ragged_batch(length=8)
    plain = dict(max_new_tokens=4, num_beams=2, no_repeat_ngram_size=2, min_new_tokens=1)
    as_numpy = {k: np.int64(v) for k, v in plain.items()}
    np.testing.assert_array_equal(
        opt_jax.generate(MODEL, PARAMS, ids, mask, **as_numpy).sequences,
        opt_jax.generate(MODEL, PARAMS, ids, mask, **plain).sequences,
    )
    contrastive = dict(max_new_tokens=3, penalty_alpha=0.6)
    np.testing.assert_array_equal(
        opt_jax.generate(MODEL, PARAMS, ids, mask, top_k=np.int32(V), **contrastive).sequences,
        opt_jax.generate(MODEL, PARAMS, ids, mask, top_k=V, **contrastive).sequences,
    )
    # penalty_alpha=0 is not contrastive search (as in transformers): it samples / decodes plainly.
    sampled = dict(max_new_tokens=3, do_sample=True, seed=1)
    np.testing.assert_array_equal(
        opt_jax.generate(MODEL, PARAMS, ids, mask, penalty_alpha=0.0, **sampled).sequences,
        opt_jax.generate(MODEL, PARAMS, ids, mask, **sampled).sequences,
    )
    out = opt_jax.generate(MODEL, PARAMS, ids, mask, max_new_tokens=4, vocab_limit=3)
    assert (out.sequences[:, 8:] < 3).all()
    # min_new_tokens == max_new_tokens is fine; tuples and arrays of ids are lists of lists.
    opt_jax.generate(
        MODEL,
        PARAMS,
        ids,
        mask,
        max_new_tokens=3,
        min_new_tokens=3,
        bad_words_ids=(np.array([5, 6]),),
        stop_sequences=[(7,)],
    )


def test_beam_sampling_keeps_a_continuation_per_eos_id():
    # top_k=1 would leave one finite candidate per beam; transformers keeps len(eos) + 1 (2
    # without EOS ids), so both beams of every row stay alive with real scores.
    ids, mask = ragged_batch(length=8)
    out = opt_jax.generate(
        MODEL,
        PARAMS,
        ids,
        mask,
        max_new_tokens=6,
        do_sample=True,
        num_beams=2,
        num_return_sequences=2,
        top_k=1,
        eos_token_id=[],
        seed=0,
    )
    scores = out.sequences_scores.reshape(3, 2)
    assert np.isfinite(scores).all() and (scores > -1e3).all(), scores
    for row in range(3):
        assert (out.sequences[2 * row, 8:] != out.sequences[2 * row + 1, 8:]).any()
