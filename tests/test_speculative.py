"""Speculative decoding: greedy output equals the target's plain greedy output token for token
(ragged batches, several K, a draft that mostly disagrees, EOS and max_new_tokens inside a
draft, prompt lookup, the heuristic schedule), sampled output follows the target's distribution
(and a wrong acceptance rule is caught), transformers' assisted generation agrees, and bad
requests fail before compiling."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import make_hf_model, ragged_batch, random_tiny_model, save_hf

import opt_jax
from opt_jax.generation import api, speculative

TARGET_CONFIG, TARGET, TARGET_PARAMS = random_tiny_model(
    init_std=0.3, noise_seed=3, dropout=0.0, hidden_size=32, ffn_dim=64,
    max_position_embeddings=64,
)  # fmt: skip
# A one-layer draft with its own random weights: it mostly disagrees with the target.
DRAFT_CONFIG, DRAFT, DRAFT_PARAMS = random_tiny_model(
    init_std=0.3, noise_seed=4, dropout=0.0, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
    max_position_embeddings=64,
)  # fmt: skip
IDS, MASK = ragged_batch()  # 3 left-padded rows of different lengths


def _greedy(**options):
    return opt_jax.generate(TARGET, TARGET_PARAMS, IDS, MASK, **options)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_greedy_equals_plain_greedy_with_a_draft_that_disagrees(k):
    plain = _greedy(max_new_tokens=12, eos_token_id=[])
    out = _greedy(max_new_tokens=12, eos_token_id=[], assistant_model=DRAFT,
                  assistant_params=DRAFT_PARAMS, num_assistant_tokens=k,
                  output_acceptance=True)  # fmt: skip
    np.testing.assert_array_equal(out.sequences, plain.sequences)
    steps = out.acceptance >= 0
    assert (out.acceptance[steps] <= k).all()
    # Every row produced exactly 12 tokens: one per step plus its accepted drafts.
    np.testing.assert_array_equal(((out.acceptance + 1) * steps).sum(1), [12, 12, 12])


def test_eos_and_max_new_tokens_inside_a_draft_and_a_perfect_draft():
    """The target drafting for itself accepts everything, so EOS and the token budget fall
    inside drafts; rows stop there exactly as plain greedy does."""
    plain = _greedy(max_new_tokens=9, eos_token_id=[]).sequences[2, IDS.shape[1] :].tolist()
    j = next(i for i in range(2, 5) if plain.index(plain[i]) == i)  # a first occurrence
    eos = plain[j]  # ends row 2 at its (j + 1)-th new token, inside the first draft of 5
    plain = _greedy(max_new_tokens=9, eos_token_id=[eos], output_logprobs=True)
    out = _greedy(max_new_tokens=9, eos_token_id=[eos], assistant_model=TARGET,
                  assistant_params=TARGET_PARAMS, num_assistant_tokens=5,
                  output_acceptance=True, output_logprobs=True)  # fmt: skip
    np.testing.assert_array_equal(out.sequences, plain.sequences)
    np.testing.assert_allclose(out.logprobs, plain.logprobs, atol=2e-5)
    assert out.acceptance[2].tolist()[:2] == [j + 1, -1]  # drafts up to EOS, then done
    for row in (0, 1):
        if eos not in out.sequences[row, IDS.shape[1] :]:
            # 5 drafts + the target's token, then 3 of the next 5 drafts: max_new_tokens = 9
            assert out.acceptance[row].tolist()[:3] == [5, 3, -1]


@pytest.mark.parametrize("ids, mask, max_new", [
    ([[7]], [[1]], 58),  # no room for bucketing: a one-token buffer prompt
    ([[1, 7], [4, 9]], [[0, 1], [1, 1]], 57),  # two tokens, the first row's one a pad
])  # fmt: skip
def test_a_perfect_draft_accepts_everything_from_the_shortest_prompts(ids, mask, max_new):
    """The draft's cache lags the text by two tokens (an iteration's first draft call feeds
    the last two): with prompts that leave nothing (or padding) to prefill, a draft equal to
    the target still accepts every draft, so its cache held exactly the right tokens."""
    ids, mask = np.array(ids), np.array(mask)
    plain = opt_jax.generate(TARGET, TARGET_PARAMS, ids, mask, max_new_tokens=max_new,
                             eos_token_id=[])  # fmt: skip
    out = opt_jax.generate(TARGET, TARGET_PARAMS, ids, mask, max_new_tokens=max_new,
                           eos_token_id=[], assistant_model=TARGET,
                           assistant_params=TARGET_PARAMS, num_assistant_tokens=3,
                           output_acceptance=True)  # fmt: skip
    np.testing.assert_array_equal(out.sequences, plain.sequences)
    for row in out.acceptance:
        steps = row[row >= 0].tolist()
        assert steps[:-1] == [3] * (len(steps) - 1)  # 4 tokens a step until the budget
        assert 4 * (len(steps) - 1) < max_new <= 4 * len(steps)


def test_streaming_sends_the_steps_plain_decoding_sends():
    """Rows advance by different amounts per iteration; the streamer still gets one call per
    step with every row's token (the pad id after a row's EOS), as in plain decoding."""
    plain = _greedy(max_new_tokens=10, eos_token_id=[]).sequences[2, IDS.shape[1] :].tolist()
    eos = plain[next(i for i in range(2, 6) if plain.index(plain[i]) == i)]  # ends row 2 early
    calls = {"plain": [], "speculative": []}
    options = dict(max_new_tokens=10, eos_token_id=[eos])
    for name, extra in (("plain", {}), ("speculative", dict(assistant_model=DRAFT,
                        assistant_params=DRAFT_PARAMS, num_assistant_tokens=3))):  # fmt: skip
        out = _greedy(**options, **extra, streamer=lambda step, tokens, name=name: calls[
            name].append((step, tokens.tolist())))  # fmt: skip
    assert calls["speculative"] == calls["plain"] and len(calls["plain"]) == 10
    assert calls["plain"][-1][1][2] == 1  # row 2 finished: the pad id
    np.testing.assert_array_equal(out.sequences, _greedy(**options).sequences)
    steps = []  # a streamer that returns False stops decoding
    _greedy(**options, **extra, streamer=lambda step, tokens: steps.append(step) or step < 2)
    assert steps == [0, 1, 2]


def test_prompt_lookup_and_the_heuristic_schedule_equal_plain_greedy():
    repeated = np.concatenate([IDS[:, -6:], IDS[:, -6:], IDS[:, -6:]], axis=1)  # repeats itself
    mask = np.concatenate([MASK[:, -6:]] * 3, axis=1)
    plain = opt_jax.generate(TARGET, TARGET_PARAMS, repeated, mask, max_new_tokens=10)
    out = opt_jax.generate(TARGET, TARGET_PARAMS, repeated, mask, max_new_tokens=10,
                           prompt_lookup_num_tokens=4, output_acceptance=True)  # fmt: skip
    np.testing.assert_array_equal(out.sequences, plain.sequences)
    out = _greedy(max_new_tokens=20, assistant_model=TARGET, assistant_params=TARGET_PARAMS,
                  num_assistant_tokens=2, num_assistant_tokens_schedule="heuristic",
                  eos_token_id=[], output_acceptance=True)  # fmt: skip
    plain = _greedy(max_new_tokens=20, eos_token_id=[])
    np.testing.assert_array_equal(out.sequences, plain.sequences)
    # A perfect draft grows the draft length: 2, then 4, then 6 accepted.
    assert out.acceptance[0, :3].tolist() == [2, 4, 6]


def test_history_processors_see_the_drafts_before_each_position():
    """Penalties depend on what each position has seen, drafts included: with them on, greedy
    speculative output still equals plain greedy output."""
    options = dict(max_new_tokens=12, eos_token_id=[], repetition_penalty=1.5,
                   presence_penalty=0.3, min_new_tokens=4)  # fmt: skip
    plain = _greedy(**options)
    out = _greedy(assistant_model=TARGET, assistant_params=TARGET_PARAMS,
                  num_assistant_tokens=4, **options)  # fmt: skip
    np.testing.assert_array_equal(out.sequences, plain.sequences)


def test_no_repeat_ngram_bad_words_and_stop_sequences_see_each_row_own_history():
    """These read the text before each position, which differs per row and per draft: with all
    three on (each changing the output), greedy speculative output equals plain greedy output,
    with a draft that disagrees, a perfect draft (the stop falls inside a draft) and lookup."""
    n = IDS.shape[1]
    free = _greedy(max_new_tokens=12, eos_token_id=[]).sequences[:, n:]
    options = dict(max_new_tokens=12, eos_token_id=[], no_repeat_ngram_size=2,
                   bad_words_ids=[[int(free[0, 0])], free[1, 3:5].tolist()])  # fmt: skip
    banned = _greedy(**options).sequences[:, n:]
    options["stop_sequences"] = [banned[2, 4:6].tolist()]
    plain = _greedy(**options).sequences
    assert (plain[:, n:] != free).any(1).all()  # every row's text changed
    assert (plain[2, n + 6 :] == 1).all()  # row 2 stopped after its stop sequence
    for extra in (dict(assistant_model=DRAFT, assistant_params=DRAFT_PARAMS,
                       num_assistant_tokens=3),
                  dict(assistant_model=TARGET, assistant_params=TARGET_PARAMS,
                       num_assistant_tokens=5),
                  dict(prompt_lookup_num_tokens=3)):  # fmt: skip
        np.testing.assert_array_equal(_greedy(**options, **extra).sequences, plain)


def test_draft_length_never_recompiles():
    _greedy(max_new_tokens=6, assistant_model=DRAFT, assistant_params=DRAFT_PARAMS,
            num_assistant_tokens=5)  # fmt: skip
    before = api.TRACE_COUNT["n"]
    for k in (6, 7, 8):  # one capacity (8): the draft length is a traced value
        _greedy(max_new_tokens=6, assistant_model=DRAFT, assistant_params=DRAFT_PARAMS,
                num_assistant_tokens=k)  # fmt: skip
    assert api.TRACE_COUNT["n"] == before


# ---------------------------------------------------------------------------------------------
# Sampling follows the target's distribution
# ---------------------------------------------------------------------------------------------
SMALL = dict(vocab_size=8, hidden_size=16, ffn_dim=32, num_attention_heads=2,
             max_position_embeddings=48, dropout=0.0, pad_token_id=1, bos_token_id=2,
             eos_token_id=2)  # fmt: skip


def _joint_counts(rows=4000):
    """Counts of the first two sampled tokens over `rows` independent rows, and their exact
    probabilities under the target (temperature 0.8, top_k 6)."""
    t_config, target, t_params = random_tiny_model(init_std=0.6, noise_seed=11, **SMALL)
    _, draft, d_params = random_tiny_model(init_std=0.6, noise_seed=12, num_hidden_layers=1,
                                           **SMALL)  # fmt: skip
    prompt = np.array([[2, 5, 3, 6, 4]], np.int32)
    options = dict(do_sample=True, temperature=0.8, top_k=6, eos_token_id=[], max_new_tokens=2)
    out = opt_jax.generate(target, t_params, np.repeat(prompt, rows, 0), seed=7,
                           assistant_model=draft, assistant_params=d_params,
                           num_assistant_tokens=3, **options)  # fmt: skip
    first, second = out.sequences[:, 5], out.sequences[:, 6]
    counts = np.zeros((8, 8))
    np.add.at(counts, (first, second), 1)

    def probs(ids):
        logits = np.asarray(target.apply({"params": t_params}, ids).logits[:, -1], np.float64)
        logits = logits / 0.8
        kth = np.sort(logits, axis=-1)[:, -6][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True)

    p1 = probs(prompt)[0]
    continuations = np.concatenate([np.repeat(prompt, 8, 0), np.arange(8)[:, None]], axis=1)
    exact = p1[:, None] * probs(continuations)  # [first, second]
    return counts, exact


def _p_value(counts, exact):
    keep = exact.ravel() > 0
    assert counts.ravel()[~keep].sum() == 0  # nothing outside the target's support
    expected = exact.ravel()[keep] * counts.sum()
    return scipy.stats.chisquare(counts.ravel()[keep], expected).pvalue


def test_sampled_tokens_follow_the_target_distribution():
    counts, exact = _joint_counts()
    assert _p_value(counts, exact) > 1e-3


def test_a_wrong_acceptance_rule_is_caught(monkeypatch):
    """Accepting every draft makes the output follow the draft's distribution: the same
    statistic rejects it."""
    monkeypatch.setattr(speculative, "accept_draft", lambda u, p, q: u < 2)
    api.PROGRAMS.clear()
    try:
        counts, exact = _joint_counts()
    finally:
        monkeypatch.undo()
        api.PROGRAMS.clear()
    assert _p_value(np.where(exact > 0, counts, 0), exact) < 1e-6


# ---------------------------------------------------------------------------------------------
# transformers' assisted generation, and bad requests
# ---------------------------------------------------------------------------------------------
def test_greedy_equals_transformers_assisted_generation(tmp_path):
    hf_target = make_hf_model("pre_ln", seed=1)
    hf_draft = make_hf_model("pre_ln", seed=2, num_hidden_layers=1)
    config, params = opt_jax.load_pretrained(save_hf(hf_target, tmp_path / "t"))
    d_config, d_params = opt_jax.load_pretrained(save_hf(hf_draft, tmp_path / "d"))
    ids, mask = ragged_batch(batch=1, length=7)
    with torch.no_grad():
        ref = hf_target.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            assistant_model=hf_draft, max_new_tokens=10, do_sample=False,
            num_assistant_tokens=4, eos_token_id=None, pad_token_id=1,
        )  # fmt: skip
    ours = opt_jax.generate(opt_jax.OPTForCausalLM(config), params, ids, mask,
                            max_new_tokens=10, eos_token_id=[],
                            assistant_model=opt_jax.OPTForCausalLM(d_config),
                            assistant_params=d_params, num_assistant_tokens=4)  # fmt: skip
    np.testing.assert_array_equal(ours.sequences, ref.numpy())


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(num_assistant_tokens=0), "num_assistant_tokens must be >= 1, got 0"),
        (dict(num_beams=2), "not with beam search or contrastive search"),
        (dict(prompt_lookup_num_tokens=3), "pass assistant_model= or prompt_lookup_num_tokens="),
        (dict(assistant_params=None), "assistant_model needs assistant_params"),
        (dict(max_new_tokens=48), r"\+ 9 slots for drafts exceeds the model's "),
    ],
)
def test_bad_requests_fail_before_compiling(options, match):
    args = dict(max_new_tokens=4, assistant_model=DRAFT, assistant_params=DRAFT_PARAMS)
    args.update(options)
    before = api.TRACE_COUNT["n"]
    with pytest.raises(ValueError, match=match):
        _greedy(**args)
    assert api.TRACE_COUNT["n"] == before


def test_an_assistant_with_another_vocabulary_is_refused():
    _, other, other_params = random_tiny_model(vocab_size=64, hidden_size=16, ffn_dim=32,
                                               num_hidden_layers=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"assistant's vocabulary \(64 ids\) differs from the "
                       r"model's \(99\)"):  # fmt: skip
        _greedy(max_new_tokens=4, assistant_model=other, assistant_params=other_params)


def test_the_study_scripts_distil_a_draft_and_benchmark_it(tmp_path):
    """experiments/speculative/distil.py and scripts/benchmark_speculative.py as the study runs
    them, on a tiny random target with a workdir's layout (export/, data/*.npy)."""
    target = tmp_path / "target"
    opt_jax.save_pretrained(target / "export", TARGET_CONFIG, TARGET_PARAMS)
    (target / "data").mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("train", 4000), ("eval", 2000)):
        np.save(target / "data" / f"{name}.npy", rng.integers(3, 99, size).astype(np.uint16))
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def run(*args):
        proc = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    out = run("experiments/speculative/distil.py", "--target", str(target), "--out",
              str(tmp_path / "draft"), "--hidden", "16", "--layers", "1", "--heads", "2",
              "--steps", "4", "--eval_every", "2", "--batch", "2", "--seq_len", "16")  # fmt: skip
    assert "step 4: train KL" in out and "greedy agreement" in out
    draft_config, _ = opt_jax.load_pretrained(str(tmp_path / "draft"))
    assert (draft_config.hidden_size, draft_config.num_hidden_layers) == (16, 1)
    assert draft_config.vocab_size == TARGET_CONFIG.vocab_size
    run("scripts/benchmark_speculative.py", "--target", str(target), "--draft",
        str(tmp_path / "draft"), "--ks", "2", "--lookup_ks", "2", "--prompts", "1", "--reps", "1",
        "--prompt_len", "8", "--new_tokens", "4", "--grounded", "1", "--grounded_len", "8",
        "--copy", "1", "--copy_cue", "3",
        "--output", str(tmp_path / "r.json"), "--plot", str(tmp_path / "k.png"))  # fmt: skip
    results = json.loads((tmp_path / "r.json").read_text())
    names = {row["variant"] for row in results["rows"]}
    assert {"greedy K=2", "sampled K=2", "greedy heuristic", "grounded lookup K=2",
            "copy plain greedy", "copy lookup K=2"} <= names  # fmt: skip
    assert results["transformers_assisted"]["ratio"] > 0
    assert set(results["forward_ms"]["target"]) == {"1", "2", "3", "5", "9", "13"}
    assert (tmp_path / "k.png").stat().st_size > 0
    # Without a draft: plain decoding and prompt lookup only.
    run("scripts/benchmark_speculative.py", "--target", str(target), "--lookup_ks", "2",
        "--prompts", "1", "--reps", "1", "--prompt_len", "8", "--new_tokens", "4",
        "--grounded", "0", "--copy", "1", "--grounded_len", "8", "--copy_cue", "3",
        "--output", str(tmp_path / "lookup.json"))  # fmt: skip
    lookup = json.loads((tmp_path / "lookup.json").read_text())
    assert {row["variant"] for row in lookup["rows"]} == {
        "plain greedy", "plain sampled", "lookup K=2", "copy plain greedy", "copy lookup K=2"
    }  # fmt: skip
    assert "transformers_assisted" not in lookup and "draft" not in lookup["forward_ms"]
