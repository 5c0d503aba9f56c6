"""The data pipeline: sources, held-out split, packing, determinism and per-process slices."""

import json

import numpy as np
import pytest

import opt_jax
from opt_jax.training import data


def test_sources_globs_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta")
    (tmp_path / "b.txt").write_text("gamma")
    records = [{"text": "first doc"}, {"text": "second doc"}, {"other": 1}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n")
    docs = data.load_documents(f"{tmp_path}/*.txt,{tmp_path}/*.jsonl")
    assert [text for _, text in docs] == ["alpha beta", "gamma", "first doc", "second doc"]
    (tmp_path / "bad.jsonl").write_text(json.dumps(records[2]) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 has no field 'text'"):
        data.load_documents(str(tmp_path / "bad.jsonl"))
    assert len(data.load_documents("stdlib", max_files=5)) == 5


def test_held_out_split_is_by_file_and_stable():
    docs = data.load_documents("stdlib", max_files=200)
    train, held = data.split_documents(docs, 0.1)
    assert {n for n, _ in train}.isdisjoint({n for n, _ in held})
    assert len(train) + len(held) == 200 and 5 <= len(held) <= 40
    again_train, again_held = data.split_documents(list(reversed(docs)), 0.1)
    assert {n for n, _ in held} == {n for n, _ in again_held}


def test_packing_determinism_and_process_slices():
    tok = opt_jax.train_tokenizer(["hello world\n"] * 50, vocab_size=270)
    stream = data.tokenize(tok, ["hello", "world world"])
    assert stream[0] == 2 and list(stream).count(2) == 2  # each document opens with </s>
    tokens = np.arange(1000, dtype=np.int32)
    ds = data.PackedDataset(tokens, seq_len=10, global_batch=8, seed=3)
    a, b = ds.batch(5), data.PackedDataset(tokens, 10, 8, 3).batch(5)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])  # a pure function of step
    halves = [ds.batch(5, process_index=i, process_count=2)["input_ids"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), a["input_ids"])
    # One epoch visits every sequence once.
    seen = np.concatenate([ds.global_indices(s) for s in range(100 // 8)])
    assert len(set(seen.tolist())) == len(seen)
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        ds.batch(0, 0, 3)
    with pytest.raises(ValueError, match="not one sequence of seq_len 2000"):
        data.PackedDataset(tokens, 2000, 8, 0)


def _corpus(tmp_path, n=12):
    for i in range(n):
        lines = [
            f"def func_{i}_{j}(alpha_{j}, beta):\n    return alpha_{j} * {i + j}\n"
            for j in range(60)
        ]
        (tmp_path / f"doc{i}.py").write_text("".join(lines))
    return str(tmp_path / "*.py")


def test_cache_is_rebuilt_when_the_data_config_changes(tmp_path):
    from train_helpers import tiny_train_config

    source = _corpus(tmp_path)
    workdir = tmp_path / "run"
    config = tiny_train_config(
        **{"data.source": source, "data.vocab_size": 280, "data.eval_fraction": 0.5}
    )
    tok, train_a, _ = data.prepare(config, workdir)
    assert tok.vocab_size == 280 and (workdir / "data" / "meta.json").exists()
    # Same config: the cache is read back, not rebuilt.
    mtime = (workdir / "data" / "train.npy").stat().st_mtime_ns
    data.prepare(config, workdir)
    assert (workdir / "data" / "train.npy").stat().st_mtime_ns == mtime
    # A changed data config before any checkpoint: rebuilt with the new settings.
    changed = tiny_train_config(
        **{"data.source": source, "data.vocab_size": 320, "data.eval_fraction": 0.5}
    )
    tok, train_b, _ = data.prepare(changed, workdir)
    assert tok.vocab_size == 320
    assert data.OPTTokenizer.from_pretrained(workdir / "data" / "tokenizer").vocab_size == 320
    # Resuming a run trained on the cached tokens with other settings is refused, named.
    with pytest.raises(ValueError, match=r"data config changed .*vocab_size: 320 -> 280"):
        data.prepare(config, workdir, resuming=True)


def test_fine_tuning_defaults_to_the_checkpoints_tokenizer(tmp_path):
    from train_helpers import tiny_train_config

    source = _corpus(tmp_path)
    ckpt = tmp_path / "ckpt"
    opt_jax.train_tokenizer(["some text to learn from " * 30], 270).save(ckpt)
    config = tiny_train_config(
        init_from=str(ckpt), **{"data.source": source, "data.eval_fraction": 0.5}
    )
    assert data.tokenizer_source(config) == str(ckpt)
    tok, _, _ = data.prepare(config, tmp_path / "run")
    assert tok.vocab_size == 270  # the checkpoint's vocabulary, not a freshly trained one
    other = tmp_path / "other"
    opt_jax.train_tokenizer(["different words entirely " * 30], 260).save(other)
    explicit = tiny_train_config(init_from=str(ckpt), **{"data.tokenizer": str(other)})
    assert data.tokenizer_source(explicit) == str(other)
    (tmp_path / "bare").mkdir()
    with pytest.raises(ValueError, match="has no tokenizer"):
        data.tokenizer_source(tiny_train_config(init_from=str(tmp_path / "bare")))


def test_cache_identity_is_the_tokenizer_content_and_half_builds_are_never_taken(tmp_path):
    import shutil

    from train_helpers import tiny_train_config

    source = _corpus(tmp_path)
    first = tmp_path / "tok_a"
    opt_jax.train_tokenizer(["some text to learn from " * 30], 270).save(first)
    fields = {"data.source": source, "data.eval_fraction": 0.5}
    workdir = tmp_path / "run"
    data.prepare(tiny_train_config(**fields, **{"data.tokenizer": str(first)}), workdir)
    # The same tokenizer at another path (a moved directory, another host's mount) is the same
    # cache, also when resuming.
    moved = tmp_path / "tok_b"
    shutil.copytree(first, moved)
    same = tiny_train_config(**fields, **{"data.tokenizer": str(moved)})
    meta = (workdir / "data" / "meta.json").read_text()
    data.prepare(same, workdir, resuming=True)
    assert (workdir / "data" / "meta.json").read_text() == meta  # not rebuilt
    # A build that died half-way leaves its marker: that cache is rebuilt, even on resume.
    (workdir / "data" / "BUILDING").touch()
    (workdir / "data" / "eval.npy").unlink()
    np.save(workdir / "data" / "eval.npy", np.zeros(3, np.int32))
    _, _, eval_tokens = data.prepare(same, workdir, resuming=True)
    assert not (workdir / "data" / "BUILDING").exists() and eval_tokens.size > 3
