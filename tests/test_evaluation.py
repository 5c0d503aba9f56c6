"""Evaluation: sliding-window perplexity and log-likelihood scoring against transformers
(PyTorch) on the same checkpoint, and the lm-eval backend against lm-eval's own `hf` backend
on local tasks (tests/eval_tasks), offline."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import opt_jax
from opt_jax.evaluation import loglikelihood, loglikelihood_rolling, perplexity, scoring

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "eval_tasks"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random transformers OPT and its tokenizer, saved as an HF directory; the model's
    vocabulary is exactly the tokenizer's (no padded rows for greedy decoding to pick)."""
    import transformers

    texts = [json.loads(line)["text"] for line in (TASKS / "docs.jsonl").read_text().splitlines()]
    texts += [
        json.loads(line)["question"] for line in (TASKS / "mc.jsonl").read_text().splitlines()
    ]
    tokenizer = opt_jax.train_tokenizer(texts * 3, vocab_size=400)
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
        num_attention_heads=4, max_position_embeddings=96, word_embed_proj_dim=32,
    )  # fmt: skip
    model = transformers.OPTForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return model, str(directory), tokenizer


def _torch_logp(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, from transformers, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def test_perplexity_script_matches_transformers(checkpoint, tmp_path):
    hf_model, directory, tokenizer = checkpoint
    text = (TASKS / "docs.jsonl").read_text()  # ~4k characters: many windows of 64
    path = tmp_path / "text.txt"
    path.write_text(text)
    out = tmp_path / "out.json"
    subprocess.run(
        [sys.executable, "scripts/evaluate.py", "--model", directory, "--perplexity", str(path),
         "--max_length", "64", "--stride", "24", "--output", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    got = json.loads(out.read_text())["perplexity"]
    ids = tokenizer.encode(text)
    expected, count = _torch_perplexity(hf_model, ids, 64, 24)
    assert count == len(ids) - 1  # every token after `</s>` scored once
    assert got == pytest.approx(expected, rel=1e-4)
    # --quantize: the weights quantised as they load, a perturbation of the float model.
    subprocess.run(
        [sys.executable, "scripts/evaluate.py", "--model", directory, "--perplexity", str(path),
         "--max_length", "64", "--stride", "24", "--quantize", "int8", "--output", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    quantized = json.loads(out.read_text())["perplexity"]
    assert quantized != got and quantized == pytest.approx(got, rel=0.05)
    # Disjoint windows (stride == max_length): the same recipe, in-process.
    config, params = opt_jax.load_pretrained(directory)
    ours = perplexity(opt_jax.OPTForCausalLM(config), params, ids, max_length=64, stride=64)
    expected, count = _torch_perplexity(hf_model, ids, 64, 64)
    assert ours["tokens"] == count < len(ids) - 1
    assert ours["perplexity"] == pytest.approx(expected, rel=1e-4)


def _torch_perplexity(model, ids, max_length, stride):
    """The recipe in transformers, token by token: windows of max_length every stride tokens,
    each scoring the tokens no earlier window scored (never its own first token), with the
    rest of its window as context. Returns (perplexity, tokens scored)."""
    total, count, previous_end = 0.0, 0, 1
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        logp = _torch_logp(model, ids[begin:end])  # predicts ids[begin + 1 : end]
        new = min(end - previous_end, end - begin - 1)
        total, count = total - logp[len(logp) - new :].sum(), count + new
        previous_end = end
        if end == len(ids):
            break
    return math.exp(total / count), count


def test_loglikelihood_matches_transformers_and_compiles_few_shapes(checkpoint):
    hf_model, directory, tokenizer = checkpoint
    config, params = opt_jax.load_pretrained(directory)
    model = opt_jax.OPTForCausalLM(config)
    lines = [json.loads(line) for line in (TASKS / "mc.jsonl").read_text().splitlines()][:12]
    requests = [(q["question"], " " + c) for q in lines for c in q["choices"][:2]]
    requests += [("", "def f(x):"), ("x = ", "1")]  # empty context; trailing space moves
    programs = scoring._programs(config)
    before = [f._cache_size() for f in programs]
    got = loglikelihood(model, params, tokenizer, requests, batch_size=4)
    hidden, head = (f._cache_size() - b for f, b in zip(programs, before, strict=True))
    # Packed rows: one decoder shape for the whole call; the LM head's few scored-position
    # buckets (the multiples of 64 its batches' scored tokens round up to) compile only the
    # small head program.
    assert hidden == 1 and head <= 3, (hidden, head)
    for (context, continuation), (score, _) in zip(requests, got, strict=True):
        context_ids, continuation_ids = scoring.encode_pair(tokenizer, context, continuation)
        logp = _torch_logp(hf_model, context_ids + continuation_ids)
        assert score == pytest.approx(logp[-len(continuation_ids) :].sum(), rel=1e-4, abs=1e-4)
    # Whether the continuation is greedy: true for the model's own argmax continuation.
    context_ids = tokenizer.encode("def mode(data):")
    with torch.no_grad():
        best = int(hf_model(torch.tensor([context_ids])).logits[0, -1].argmax())
    [(_, greedy)] = scoring.score_pairs(model, params, [(context_ids, [best])])
    assert greedy
    # Rolling: every token after `</s>` once, windows of the model's context.
    docs = [json.loads(line)["text"] for line in (TASKS / "docs.jsonl").read_text().splitlines()]
    doc = max(docs, key=len)
    [rolling] = loglikelihood_rolling(model, params, tokenizer, [doc])
    ids = tokenizer.encode(doc)
    windows = scoring.rolling_windows(ids[1:], ids[0], config.max_position_embeddings)
    assert len(windows) > 1
    expected = sum(_torch_logp(hf_model, c + t)[-len(t) :].sum() for c, t in windows)
    assert rolling == pytest.approx(expected, rel=1e-4)


def test_shared_contexts_score_as_alone(checkpoint):
    """Continuations of one context share it in a row; a group too long for one row is split,
    and contexts truncated differently (long continuations) are not shared: every score equals
    the request scored on its own."""
    _, directory, _ = checkpoint
    config, params = opt_jax.load_pretrained(directory)
    model = opt_jax.OPTForCausalLM(config)
    rng = np.random.default_rng(3)
    tokens = lambda n: rng.integers(4, config.vocab_size, n).tolist()  # noqa: E731
    long_context, context = tokens(90), tokens(40)
    pairs = [(context, tokens(15)) for _ in range(5)]  # 40 + 5 x 14 > 96: two units
    pairs += [(long_context, tokens(n)) for n in (10, 10, 12)]  # left-truncated to 96
    pairs += [(tokens(3), tokens(2)), (context, tokens(1))]
    units = scoring._share_contexts(
        [((c + x)[-97:][:-1], None, len(x)) for c, x in pairs], config.max_position_embeddings
    )
    assert sorted(len(members) for members, _ in units) == [1, 1, 1, 1, 2, 4], units
    together = scoring.score_pairs(model, params, pairs, batch_size=2)
    for pair, (score, greedy) in zip(pairs, together, strict=True):
        [(alone, alone_greedy)] = scoring.score_pairs(model, params, [pair], batch_size=1)
        assert score == pytest.approx(alone, rel=1e-5) and greedy == alone_greedy


def test_score_targets_is_the_log_softmax_and_first_argmax():
    """The vocabulary-chunked head equals log_softmax and argmax over the whole vocabulary,
    ties included (a tie goes to the first index, as argmax), whatever the chunking."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    table = rng.standard_normal((37, 8)).astype(np.float32)
    table[20] = table[5]  # an exact tie between vocabulary entries 5 and 20
    hidden = rng.standard_normal((6, 8)).astype(np.float32)
    hidden[0] = hidden[1] = table[5] * 3  # 5 and 20 tie for the maximum of rows 0 and 1
    targets = np.array([5, 20, 0, 36, 11, 2], np.int32)
    logits = hidden @ table.T
    targets[2] = logits[2].argmax()
    expected = jax.nn.log_softmax(jnp.asarray(logits), -1)[np.arange(6), targets]
    for chunks in (1, 4, 5, 16):
        logp, greedy = scoring.score_targets(hidden, table, targets, chunks)
        np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-6)
        assert greedy.tolist() == (logits.argmax(-1) == targets).tolist(), chunks
    assert logits[1, 5] == logits[1, 20] and greedy[0] and greedy[2] and not greedy[1]


def test_bad_requests_are_errors(checkpoint):
    _, directory, tokenizer = checkpoint
    config, params = opt_jax.load_pretrained(directory)
    model = opt_jax.OPTForCausalLM(config)
    with pytest.raises(ValueError, match="request 0: the continuation '' encodes to no token"):
        loglikelihood(model, params, tokenizer, [("def f", "")])
    with pytest.raises(ValueError, match="request 0: continuation of 200 tokens exceeds"):
        scoring.score_pairs(model, params, [([2], [5] * 200)])
    with pytest.raises(ValueError, match=r"stride must be in \(0, max_length=64\]"):
        perplexity(model, params, [2, 5, 6], max_length=64, stride=100)


def _numbers(x) -> list[float]:
    if isinstance(x, (list, tuple, np.ndarray)):
        return [n for item in x for n in _numbers(item)]
    return [float(x)]


def _per_request(results, task):
    return [s["filtered_resps"] for s in results["samples"][task]]


def test_lm_eval_backend_matches_the_hf_backend(checkpoint, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import opt_jax.eval_harness  # noqa: F401

    _, directory, _ = checkpoint
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data relative to the repository
    tasks = ["opt_jax_mc", "opt_jax_rolling", "opt_jax_gen"]
    runs = {}
    for backend, args in (
        ("opt_jax", "batch_size=8"),
        ("hf", "batch_size=8,device=cpu,dtype=float32"),
    ):
        runs[backend] = lm_eval.simple_evaluate(
            model=backend, model_args=f"pretrained={directory},{args}", tasks=tasks,
            task_manager=TaskManager(include_path=str(TASKS)), limit=16,
            log_samples=True,
        )  # fmt: skip
    ours, theirs = runs["opt_jax"], runs["hf"]
    for task in ("opt_jax_mc", "opt_jax_rolling"):
        a, b = _per_request(ours, task), _per_request(theirs, task)
        assert len(a) == len(b) == (16 if task == "opt_jax_mc" else 12)
        # Per request: log-likelihoods (and greedy flags) of every choice, or a document's.
        np.testing.assert_allclose(_numbers(a), _numbers(b), rtol=1e-4, atol=1e-4)
    assert _per_request(ours, "opt_jax_gen") == _per_request(theirs, "opt_jax_gen")
    for task in tasks:
        for metric, value in ours["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert value == pytest.approx(theirs["results"][task][metric], rel=1e-4), (
                    task,
                    metric,
                )


def test_evaluate_script_errors(checkpoint, tmp_path):
    _, directory, _ = checkpoint
    cases = [
        (["--model", directory, "--tasks", "no_such_task", "--include_path", str(TASKS)],
         "unknown tasks"),
        (["--model", str(tmp_path)], "give --perplexity FILE and/or --tasks"),
        (["--model", str(tmp_path), "--perplexity", "x.txt"], "no config.json there"),
    ]  # fmt: skip
    for args, message in cases:
        proc = subprocess.run(
            [sys.executable, "scripts/evaluate.py", *args], cwd=ROOT, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
