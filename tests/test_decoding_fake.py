"""The decode loop with fake models: exact expected tokens, EOS, early exit, stop sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opt_jax.generation import GenerationConfig, decode

V = 10
PAD, EOS = 1, 2


def chain_model(successor: dict[int, int]):
    """A fake model whose next token is successor[last token] (logit 5 vs 0 elsewhere).

    Its cache is a batch-major pytree holding each row's last token and a call counter.
    """
    table = np.zeros((V, V), np.float32)
    for a in range(V):
        table[a, successor.get(a, 0)] = 5.0
    table = jnp.asarray(table)

    def tokens_to_logits(tokens, mask, cache):
        last = tokens[:, -1]
        cache = {"last": last, "calls": cache["calls"] + 1}
        hidden = jax.nn.one_hot(tokens, V)
        return table[last], hidden, cache

    return tokens_to_logits


def run(model, prompt, mask, cfg, max_new, length=16, stream=None):
    cfg = cfg.replace(
        eos_token_id=EOS if cfg.eos_token_id is None else cfg.eos_token_id,
        pad_token_id=PAD if cfg.pad_token_id is None else cfg.pad_token_id,
    )
    batch = prompt.shape[0]
    cache = {"last": jnp.zeros(batch, jnp.int32), "calls": jnp.zeros(batch, jnp.int32)}
    fn = jax.jit(
        lambda p, m, n: decode(model, cfg, p, m, cache, jax.random.key(0), n, length, stream)
    )
    tokens, logprobs = fn(jnp.asarray(prompt), jnp.asarray(mask), max_new)
    return np.asarray(tokens), np.asarray(logprobs)


SUCC = {3: 4, 4: 5, 5: 6, 6: 7, 7: EOS, 8: 9, 9: 8}


def test_exact_tokens_per_row_eos_and_padding():
    prompt = np.array([[PAD, PAD, 3], [PAD, 8, 9], [5, 5, 6]])
    mask = prompt != PAD
    tokens, _ = run(chain_model(SUCC), prompt, mask, GenerationConfig(), max_new=6)
    new = tokens[:, 3:9]
    # Row 0: 4 5 6 7 EOS then padding; row 1 never ends; row 2: 7 EOS then padding.
    np.testing.assert_array_equal(new[0], [4, 5, 6, 7, EOS, PAD])
    np.testing.assert_array_equal(new[1], [8, 9, 8, 9, 8, 9])
    np.testing.assert_array_equal(new[2], [7, EOS, PAD, PAD, PAD, PAD])
    assert (tokens[:, 9:] == PAD).all()  # the unused tail of the buffer


def test_loop_exits_early_when_every_row_is_done():
    steps = []
    prompt = np.array([[3], [6]])
    tokens, _ = run(
        chain_model(SUCC),
        prompt,
        prompt > 0,
        GenerationConfig(),
        max_new=12,
        stream=lambda step, tok: steps.append(int(step)),
    )
    assert steps == [0, 1, 2, 3, 4]  # row 0 needs 5 tokens to reach EOS; no step after that
    np.testing.assert_array_equal(tokens[0, 1:6], [4, 5, 6, 7, EOS])


def test_min_new_tokens_blocks_eos():
    prompt = np.array([[6]])
    cfg = GenerationConfig(min_new_tokens=3)
    tokens, _ = run(chain_model(SUCC), prompt, prompt > 0, cfg, max_new=5)
    # 6 -> 7 -> (EOS banned at step 1 and 2: next best is id 0) ...
    assert tokens[0, 1] == 7 and EOS not in tokens[0, 2:4]


def test_stop_sequences_end_a_row():
    prompt = np.array([[3], [8]])
    cfg = GenerationConfig(stop_sequences=((5, 6),), eos_token_id=(EOS,))
    tokens, _ = run(chain_model(SUCC), prompt, prompt > 0, cfg, max_new=8)
    np.testing.assert_array_equal(tokens[0, 1:6], [4, 5, 6, PAD, PAD])
    np.testing.assert_array_equal(tokens[1, 1:5], [9, 8, 9, 8])


def test_logprobs_of_chosen_tokens():
    prompt = np.array([[3]])
    cfg = GenerationConfig(output_logprobs=True)
    tokens, logprobs = run(chain_model(SUCC), prompt, prompt > 0, cfg, max_new=6)
    expected = 5.0 - np.log(np.exp(5.0) + V - 1)  # logit 5 against nine zeros
    np.testing.assert_allclose(logprobs[0, :5], expected, rtol=1e-6)
    assert logprobs[0, 5] == 0.0  # after EOS


@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_with_fake_model(n):
    prompt = np.array([[8]])
    cfg = GenerationConfig(no_repeat_ngram_size=n)
    tokens, _ = run(chain_model(SUCC), prompt, prompt > 0, cfg, max_new=8)
    seq = tokens[0, :9].tolist()
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    assert len(grams) == len(set(grams)), seq


@pytest.mark.parametrize(
    "kwargs", [dict(frequency_penalty=6.0), dict(presence_penalty=6.0)], ids=["freq", "presence"]
)
def test_presence_and_frequency_penalties_count_generated_tokens_only(kwargs):
    # The prompt's 8 is not penalised (only generated tokens count): 8 -> 9 -> 8; then 9 was
    # generated once (5 - 6 < 0), so the best token is 0; then 0 was generated: 1.
    prompt = np.array([[8]])
    tokens, _ = run(chain_model(SUCC), prompt, prompt > 0, GenerationConfig(**kwargs), max_new=4)
    np.testing.assert_array_equal(tokens[0, 1:5], [9, 8, 0, 1])
