"""Generation is token-identical to transformers' `generate` on left-padded ragged batches, and
the log-probabilities (output_logprobs) and beam scores it returns are transformers' too."""

import numpy as np
import pytest
import torch
from conftest import make_hf_model, ragged_batch, save_hf

import opt_jax

MAX_NEW = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for variant in ("pre_ln", "post_ln_project"):
        hf = make_hf_model(variant)
        directory = tmp_path_factory.mktemp(variant)
        save_hf(hf, directory)
        config, params = opt_jax.load_pretrained(directory)
        out[variant] = (hf, opt_jax.OPTForCausalLM(config), params)
    return out


def _hf_generate(hf, ids, mask, full=False, **kwargs):
    """transformers' greedy/beam generate on a left-padded batch, MAX_NEW tokens, pad id 1: the
    sequences, or (full) its output with the raw logits of every step and the beam scores."""
    extra = dict(return_dict_in_generate=True, output_logits=True, output_scores=True)
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            pad_token_id=1,
            **(extra if full else {}),
            **kwargs,
        )
    return out if full else out.numpy()


def _frequent_token(hf, ids, mask):
    """A token greedy decoding emits mid-way in some rows: used as EOS so rows stop early."""
    ref = _hf_generate(hf, ids, mask, eos_token_id=None)[:, ids.shape[1] :]
    values, counts = np.unique(ref[:, 2:8], return_counts=True)
    return int(values[np.argmax(counts)])


CASES = {
    "greedy": {},
    "repetition_penalty": dict(repetition_penalty=1.5),
    "no_repeat_ngram": dict(no_repeat_ngram_size=2),
    "min_new_tokens": dict(min_new_tokens=6),
    "bad_words": dict(bad_words_ids=[[5], [7, 8]]),
    "beam": dict(num_beams=3),
    "beam_returns": dict(num_beams=4, num_return_sequences=3, length_penalty=0.6),
    "beam_early": dict(num_beams=3, early_stopping=True, length_penalty=1.5),
    "beam_never": dict(num_beams=2, early_stopping="never", repetition_penalty=1.2),
}


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_project"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("stop", ["eos", "no_eos"])
def test_token_identical_to_transformers(models, variant, case, stop):
    hf, model, params = models[variant]
    ids, mask = ragged_batch(length=8)
    eos = _frequent_token(hf, ids, mask) if stop == "eos" else 2
    # Token 1 is the pad id: transformers counts left padding as "seen" history, we do not.
    # Suppressing it in both keeps that (deliberate) difference out of the comparison.
    kwargs = dict(CASES[case], suppress_tokens=[1])
    beam = "num_beams" in kwargs
    out = opt_jax.generate(model, params, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos,
                           output_logprobs=not beam, **kwargs)  # fmt: skip
    theirs = _hf_generate(hf, ids, mask, full=True, eos_token_id=eos, **kwargs)
    ref = theirs.sequences.numpy()
    rows = ids.shape[0] * kwargs.get("num_return_sequences", 1)
    assert out.sequences.shape == (rows, ids.shape[1] + MAX_NEW)
    assert out.sequences.dtype == np.int32
    ref = np.pad(ref, ((0, 0), (0, out.sequences.shape[1] - ref.shape[1])), constant_values=1)
    np.testing.assert_array_equal(out.sequences, ref)
    if stop == "eos" and case == "greedy":
        assert (out.sequences[:, 8:] == eos).any()  # the EOS path was exercised
    if beam:  # each returned sequence's length-penalised score
        np.testing.assert_allclose(out.sequences_scores, theirs.sequences_scores.numpy(),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        return
    # The model's log-probability of each chosen token (before any processor), from
    # transformers' raw logits of that step; 0 after a row's EOS (transformers stops when
    # every row has ended).
    new = out.sequences[:, 8:]
    ended = np.cumsum(new == eos, axis=1) - (new == eos) > 0  # steps after the row's EOS
    logits = torch.stack(theirs.logits, 1).double()  # [B, steps, V]
    steps = logits.shape[1]
    assert ended[:, steps:].all() and (out.logprobs[ended] == 0).all()
    chosen = torch.tensor(new[:, :steps, None], dtype=torch.long)
    want = torch.log_softmax(logits, -1).gather(-1, chosen)[..., 0].numpy()
    live = ~ended[:, :steps]
    np.testing.assert_allclose(out.logprobs[:, :steps][live], want[live], rtol=0, atol=2e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_single_token_bad_words_equal_to_eos_are_dropped_as_in_transformers(models, num_beams):
    # transformers' NoBadWordsLogitsProcessor drops bad words [e] for EOS ids e (EOS stays
    # allowed); longer bad words ending in EOS are still banned.
    hf, model, params = models["pre_ln"]
    ids, mask = ragged_batch(length=8)
    eos = _frequent_token(hf, ids, mask)
    kwargs = dict(
        eos_token_id=[eos, 3],
        bad_words_ids=[[eos], [3], [5], [7, eos]],
        suppress_tokens=[1],
        num_beams=num_beams,
    )
    out = opt_jax.generate(model, params, ids, mask, max_new_tokens=MAX_NEW, **kwargs)
    ref = _hf_generate(hf, ids, mask, **kwargs)
    ref = np.pad(ref, ((0, 0), (0, out.sequences.shape[1] - ref.shape[1])), constant_values=1)
    np.testing.assert_array_equal(out.sequences, ref)
    assert (out.sequences[:, 8:] == eos).any()  # EOS was not banned
