"""Training on token stores: `data.mixture` and `data.source=STORE` train, log tokens and epochs
per store in metrics.jsonl, resume exactly after SIGTERM, evaluate on a held-out store, and
refuse bad stores in one line before any step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helpers import tiny_train_config

import opt_jax
from opt_jax.data import Mixture, StoreError, prepare_store
from opt_jax.training import train
from opt_jax.training.metrics import read_metrics

HELPER = Path(__file__).resolve().parent / "train_helpers.py"
WORDS = "def return class import self value print list dict range len open".split()
TIMING = {"tokens_per_s", "step_time", "tflops_per_device", "sample"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores ("code" 3x the size of "prose") and a held-out one, one tokenizer."""
    root = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(0)
    text = lambda n: " ".join(rng.choice(WORDS, size=n))  # noqa: E731
    tokenizer = opt_jax.train_tokenizer([text(30) for _ in range(200)], vocab_size=300)
    tokenizer.save(root / "tokenizer")
    for name, docs in (("code", 120), ("prose", 40), ("held_out", 30)):
        (root / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": text(60)}) + "\n" for _ in range(docs))
        )
        prepare_store(str(root / f"{name}.jsonl"), str(root / "tokenizer"), str(root / name))
    return root


def _run(workdir, overrides, *flags):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(HELPER.parent))
    cmd = [sys.executable, str(HELPER), str(workdir), json.dumps(overrides), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _records(workdir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(workdir)]


def test_a_mixture_trains_logs_each_store_and_resumes_exactly(stores, tmp_path):
    mixture = f"{stores / 'code'}:0.7,{stores / 'prose'}:0.3"
    overrides = {"data.mixture": mixture}
    _run(tmp_path / "whole", overrides)
    records = _records(tmp_path / "whole")
    assert [r["step"] for r in records] == list(range(1, 13))
    config = tiny_train_config(**overrides)
    # What the run logged is what the mixture says it read: tokens and epochs per store.
    heads = [(opt_jax.data.TokenStore(stores / n).split(config.data.eval_fraction)[0], w)
             for n, w in (("code", 0.7), ("prose", 0.3))]  # fmt: skip
    mix = Mixture(heads, config.seq_len, config.batch_size, config.seed)
    for r in records:
        expected = mix.metrics(r["step"])
        assert {k: r[k] for k in expected} == pytest.approx(expected)
        assert r["tokens/code"] + r["tokens/prose"] == r["step"] * 4 * 32
    assert "eval_loss" in records[5] and np.isfinite(records[5]["eval_loss"])
    assert records[-1]["loss"] < records[0]["loss"]
    # Preempted at step 6 and resumed: the same batches, bitwise the same run.
    proc = _run(tmp_path / "resumed", overrides, "--sigterm-at", "6")
    assert "signal 15: saved step 6" in proc.stdout
    _run(tmp_path / "resumed", overrides)
    assert _records(tmp_path / "resumed") == records


def test_one_store_with_a_held_out_store(stores, tmp_path):
    config = tiny_train_config(**{
        "data.source": str(stores / "code"), "data.eval_source": str(stores / "held_out"),
        "num_train_steps": 2, "eval_every_steps": 2, "checkpoint_every_steps": 2,
    })  # fmt: skip
    last = train.train_and_evaluate(config, str(tmp_path))
    assert last["step"] == 2 and np.isfinite(last["eval_loss"])
    assert last["tokens/code"] == 2 * 4 * 32
    run = json.loads((tmp_path / "train_config.json").read_text())
    assert run["data"]["eval_source"] == str(stores / "held_out")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"data.mixture": "CODE:0.7,PROSE:-0.3"}, "must be a positive number, got -0.3"),
        ({"data.mixture": "CODE:0.7,/no/such/store:0.3"}, "/no/such/store does not exist"),
        ({"data.source": "CODE", "data.tokenizer": "OTHER"}, "built with another tokenizer"),
    ],
)
def test_bad_stores_fail_before_any_step(stores, tmp_path, overrides, match):
    other = tmp_path / "other_tokenizer"
    opt_jax.train_tokenizer(["x y z"] * 20, vocab_size=280).save(other)
    names = {"CODE": str(stores / "code"), "PROSE": str(stores / "prose"), "OTHER": str(other)}
    resolved = {}
    for key, value in overrides.items():
        for name, path in names.items():
            value = value.replace(name, path)
        resolved[key] = value
    with pytest.raises(StoreError, match=match):
        train.train_and_evaluate(tiny_train_config(**resolved), str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists() or not any(
        (tmp_path / "w" / "checkpoints").iterdir()
    )
