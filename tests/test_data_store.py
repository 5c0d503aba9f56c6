"""Token stores and mixtures (opt_jax.data): every source format read in order with OPT's
`</s>` contract, byte-identical stores for any number of workers and after a kill -9 and
resume, mixtures that are pure functions of (seed, step) with the asked proportions and a
permutation per epoch, and bad input named in one line."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import opt_jax
from opt_jax.data import Mixture, StoreError, TokenStore, parse_mixture, prepare_store
from opt_jax.data.permutation import permute, round_keys

ROOT = Path(__file__).resolve().parent.parent
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _text(rng, words=20):
    return " ".join(rng.choice(WORDS, size=words))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    directory = tmp_path_factory.mktemp("tokenizer")
    opt_jax.train_tokenizer([_text(rng) for _ in range(50)], vocab_size=300).save(directory)
    return str(directory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Files of every kind, and the documents they hold in store order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("corpus")
    docs = {}
    records = [_text(rng) for _ in range(40)]
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    docs["a.jsonl"] = records
    records = [_text(rng) for _ in range(5)]
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(records)))
    docs["b.jsonl.gz"] = records
    records = [_text(rng) for _ in range(6)]
    data = "".join(json.dumps({"text": t}) + "\n" for t in records).encode()
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    docs["c.jsonl.zst"] = records
    records = [_text(rng) for _ in range(7)]
    pq.write_table(pa.table({"text": records}), root / "d.parquet", row_group_size=3)
    docs["d.parquet"] = records
    records = [_text(rng) for _ in range(4)]
    table = pa.table({"text": records})
    with pa.ipc.new_stream(str(root / "e.arrow"), table.schema) as writer:  # datasets' cache
        writer.write_table(table)
    docs["e.arrow"] = records
    for i in range(3):
        text = _text(rng, 50)
        (root / f"f{i}.txt").write_text(text)
        docs[f"f{i}.txt"] = [text]
    ordered = [t for name in sorted(docs) for t in docs[name]]
    return root, ordered


@pytest.fixture(scope="module")
def store(corpus, tokenizer_dir, tmp_path_factory):
    root, _ = corpus
    out = tmp_path_factory.mktemp("stores") / "one_worker"
    prepare_store(str(root / "*"), tokenizer_dir, str(out), chunk_bytes=1500)
    return str(out)


def _files(directory):
    root = Path(directory)
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_documents_are_every_record_in_order_with_the_opt_prefix(store, corpus, tokenizer_dir):
    _, docs = corpus
    tokenizer = opt_jax.OPTTokenizer.from_pretrained(tokenizer_dir)
    s = TokenStore(store)
    assert len(s) == len(docs) == 65
    expected = [tokenizer.encode(t) for t in docs]
    assert all(tokenizer.encode(t)[0] == 2 for t in docs)
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(s.document(i), want)
    assert s.num_tokens == sum(map(len, expected))
    np.testing.assert_array_equal(s.tokens(0, s.num_tokens), np.concatenate(expected))
    manifest = s.manifest
    assert manifest["dtype"] == "uint16" and len(manifest["shards"]) > 5  # a.jsonl was split
    assert {e["path"].rsplit("/", 1)[-1] for e in manifest["sources"]} >= {"a.jsonl", "e.arrow"}
    s.verify()


def test_two_workers_write_the_same_bytes(store, corpus, tokenizer_dir, tmp_path):
    root, _ = corpus
    prepare_store(str(root / "*"), tokenizer_dir, str(tmp_path / "two"), workers=2,
                  chunk_bytes=1500)  # fmt: skip
    assert _files(tmp_path / "two") == _files(store)


def test_a_killed_build_resumes_to_the_same_store(tokenizer_dir, tmp_path):
    """kill -9 while shards are being written; the same command finishes the build, and the
    result equals an uninterrupted build's, byte for byte."""
    rng = np.random.default_rng(2)
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": _text(rng, 400)}) + "\n" for _ in range(1500)))
    args = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--source", str(big),
            "--tokenizer", tokenizer_dir, "--chunk_mb", "0"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def build(out, kill_after=None):
        command = [*args, "--out", str(out)]
        if kill_after is None:
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
            return None
        proc = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(list(Path(out).glob("shard-*.json"))) >= kill_after:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return len(list(Path(out).glob("shard-*.json")))

    done_at_kill = build(tmp_path / "killed", kill_after=3)
    assert not (tmp_path / "killed" / "manifest.json").exists()  # never half-valid
    with pytest.raises(StoreError, match="interrupted; run scripts/prepare_data.py again"):
        TokenStore(tmp_path / "killed")
    build(tmp_path / "killed")
    build(tmp_path / "whole")
    whole = _files(tmp_path / "whole")
    assert 3 <= done_at_kill < sum(n.endswith(".json") and n.startswith("shard") for n in whole)
    assert _files(tmp_path / "killed") == whole


def test_invalid_utf8_is_replaced_counted_and_located(tokenizer_dir, tmp_path):
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "alpha"}) + "\n")
    (tmp_path / "z.jsonl").write_bytes(b'{"text": "beta"}\n\n{"text": "gam\xffma"}\n')
    manifest = prepare_store(str(tmp_path / "*.jsonl"), tokenizer_dir, str(tmp_path / "s"))
    assert manifest["invalid_utf8"] == {"documents": 1, "first": f"{tmp_path}/z.jsonl:3"}
    assert len(TokenStore(tmp_path / "s")) == 3


def test_damaged_stores_are_named(store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    shard = copy / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00001.bin does not match the sha256"):
        TokenStore(copy).verify()
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(StoreError, match=r"shard-00001.bin is \d+ bytes, the manifest says"):
        TokenStore(copy)
    with pytest.raises(StoreError, match="built with another tokenizer"):
        TokenStore(store).check_tokenizer("0" * 64)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: None, "matches no file"),
        (lambda d: (d / "x.jsonl").write_text('{"body": "alpha"}\n'),
         r"x.jsonl:1 has no field 'text' \(--jsonl_field\)"),
        (lambda d: (d / "x.jsonl").write_text('{"text": "a"}\nnot json\n'),
         r"x.jsonl:2 is not a JSON record"),
    ],
)  # fmt: skip
def test_bad_sources_fail_in_one_line(tokenizer_dir, tmp_path, make, match):
    make(tmp_path)
    with pytest.raises(StoreError, match=match):
        prepare_store(str(tmp_path / "*.jsonl"), tokenizer_dir, str(tmp_path / "s"))
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_a_build_with_other_settings_is_refused(store, corpus, tokenizer_dir):
    root, _ = corpus
    with pytest.raises(StoreError, match="built with other settings"):
        prepare_store(str(root / "*.jsonl"), tokenizer_dir, store, chunk_bytes=1500)


# ---------------------------------------------------------------------------------------------
# Permutations and mixtures
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 64, 1000, 4097])
def test_feistel_permutations_are_bijections_that_depend_on_the_key(n):
    first = permute(np.arange(n), n, round_keys(0, 0, 0))
    assert sorted(first.tolist()) == list(range(n))
    if n > 5:
        assert (first != permute(np.arange(n), n, round_keys(0, 0, 1))).any()


@pytest.fixture(scope="module")
def two_stores(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(3)
    for name, count in (("big", 120), ("small", 12)):
        (root / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": _text(rng, 30)}) + "\n" for _ in range(count))
        )
        prepare_store(str(root / f"{name}.jsonl"), tokenizer_dir, str(root / name))
    return str(root / "big"), str(root / "small")


def test_mixtures_are_pure_functions_of_seed_and_step(two_stores):
    big, small = two_stores
    mix = Mixture([(big, 0.7), (small, 0.3)], seq_len=16, global_batch=8, seed=5, block_size=64)
    again = Mixture([(big, 0.7), (small, 0.3)], seq_len=16, global_batch=8, seed=5, block_size=64)
    for step in (0, 3, 40, 7):
        a, b = mix.batch(step), again.batch(step)
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        assert a["input_ids"].dtype == np.int32 and a["input_ids"].shape == (8, 16)
        halves = [mix.batch(step, p, 2)["input_ids"] for p in (0, 1)]
        np.testing.assert_array_equal(np.concatenate(halves), a["input_ids"])
    other = Mixture([(big, 0.7), (small, 0.3)], seq_len=16, global_batch=8, seed=6, block_size=64)
    assert (other.batch(0)["input_ids"] != mix.batch(0)["input_ids"]).any()


def test_mixture_proportions_epochs_and_every_sample_once_per_epoch(two_stores):
    big, small = two_stores
    mix = Mixture([(big, 0.7), (small, 0.3)], seq_len=16, global_batch=8, seed=0, block_size=64)
    assert mix.shares.tolist() == [45, 19]  # 64 x 0.7 = 44.8, 64 x 0.3 = 19.2
    steps = 64  # 512 rows = 8 blocks
    rows = np.arange(steps * 8)
    store, sample = mix.sources_of(rows)
    assert np.bincount(store).tolist() == [45 * 8, 19 * 8]
    assert mix.rows_from(len(rows)).tolist() == [360, 152]
    # The small store's rows, in order: each epoch is a permutation of all its samples.
    n_small = mix.samples[1]
    small_samples = sample[store == 1]
    for e in range(len(small_samples) // n_small):
        epoch = small_samples[e * n_small : (e + 1) * n_small]
        assert sorted(epoch.tolist()) == list(range(n_small))
    logged = mix.metrics(steps)  # what training logs after `steps` steps
    assert logged["tokens/big"] == 360 * 16 and logged["tokens/small"] == 152 * 16
    assert logged["epochs/small"] == pytest.approx(152 / n_small)
    assert logged["epochs/small"] > 4 * logged["epochs/big"]  # repeated, a new order each time
    assert mix.epoch_of(steps) == logged["epochs/big"]
    # Row r of the batch holds the sample the index says it holds.
    ids = mix.batch(3)["input_ids"]
    k, s = mix.sources_of(np.arange(24, 32))
    stores = [TokenStore(big), TokenStore(small)]
    for row, kk, ss in zip(ids, k, s, strict=True):
        np.testing.assert_array_equal(row, stores[kk].tokens(ss * 16, ss * 16 + 16))


@pytest.mark.parametrize(
    "sources, match",
    [
        ([("BIG", 0.0)], "must be a positive number, got 0.0"),
        ([("BIG", -1)], "must be a positive number, got -1"),
        ([("BIG", float("nan"))], "must be a positive number"),
        ([("/no/such/store", 1.0)], "mixture store /no/such/store does not exist"),
    ],
)
def test_bad_mixtures_fail_in_one_line(two_stores, sources, match):
    sources = [(two_stores[0] if d == "BIG" else d, w) for d, w in sources]
    with pytest.raises(StoreError, match=match):
        Mixture(sources, seq_len=16, global_batch=8)


def test_mixture_specs_parse():
    assert parse_mixture("a:0.7, /x/b:0.3") == [("a", 0.7), ("/x/b", 0.3)]
    assert parse_mixture("only") == [("only", 1.0)]
    with pytest.raises(StoreError, match="mixture weight 'lots' of 'a' is not a number"):
        parse_mixture("a:lots")


def test_compression_calibrates_from_a_store(store, tokenizer_dir, tmp_path):
    """opt_jax.compress draws its calibration segments from a store's memory-mapped stream, and
    refuses a store built with another tokenizer than the model's."""
    from opt_jax.compress import data as calibration

    tokenizer = opt_jax.OPTTokenizer.from_pretrained(tokenizer_dir)
    segments = calibration.sample_segments(calibration.read_tokens(store, tokenizer), 5, 16, 3)
    whole = TokenStore(store)
    starts = np.random.default_rng(3).integers(0, whole.num_tokens - 15, size=5)
    np.testing.assert_array_equal(segments, np.stack([whole.tokens(s, s + 16) for s in starts]))
    other = opt_jax.train_tokenizer(["x y z"] * 20, vocab_size=280)
    with pytest.raises(StoreError, match="built with another tokenizer than the model's"):
        calibration.read_tokens(store, other)
