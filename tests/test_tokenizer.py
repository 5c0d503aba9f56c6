"""OPT's tokenizer contract, and agreement with transformers loading our files."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

import opt_jax
from opt_jax.tokenizer import OPTTokenizer


def _corpus():
    # Real text that ships with every interpreter: the standard library's own sources.
    stdlib = Path(json.__file__).parent.parent
    texts = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:40]]
    assert sum(map(len, texts)) > 100_000
    return texts


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok = opt_jax.train_tokenizer(_corpus(), vocab_size=600)
    directory = tmp_path_factory.mktemp("tok")
    tok.save(directory)
    return directory


SAMPLES = [
    "A photo of a cat",
    "def f(x):\n    return x  # é ü 日本",
    "",
    "  leading spaces",
    "</s>already",
]


def test_special_token_layout(tokenizer_dir):
    tok = OPTTokenizer.from_pretrained(tokenizer_dir)
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 2, 1)
    assert tok.vocab_size == 600


def test_prefix_applied_once_and_decode(tokenizer_dir):
    tok = OPTTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.encode("A photo of a cat")
    assert ids[0] == 2 and ids.count(2) == 1
    assert tok.encode("</s>already")[:2] != [2, 2]  # never twice
    assert tok.encode("x", add_prefix=False)[0] != 2
    assert tok.decode(ids) == "A photo of a cat"
    assert tok.decode(ids, skip_special_tokens=False) == "</s>A photo of a cat"
    assert tok.decode(ids + [599 + 7]) == "A photo of a cat"  # ids past the tokenizer are dropped


def test_transformers_autotokenizer_agrees(tokenizer_dir):
    ours = OPTTokenizer.from_pretrained(tokenizer_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in SAMPLES[:4]:
        assert theirs(text)["input_ids"] == ours.encode(text), text
        assert theirs.decode(ours.encode(text), skip_special_tokens=True) == ours.decode(
            ours.encode(text)
        )
    assert theirs.pad_token_id == 1 and theirs.eos_token_id == 2
    # A padded batch decodes row by row as transformers decodes it (pad and BOS dropped).
    ids, _ = ours.encode_batch(SAMPLES[:4])
    assert ours.batch_decode(ids) == theirs.batch_decode(ids.tolist(), skip_special_tokens=True)
    assert ours.batch_decode(ids)[0] == SAMPLES[0]


def test_vocab_and_merges_only(tokenizer_dir, tmp_path):
    """Directories with just vocab.json + merges.txt (like facebook/opt-*) load the same."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    ours = OPTTokenizer.from_pretrained(tokenizer_dir)
    plain = OPTTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert plain.encode(text) == ours.encode(text), text


def test_batch_left_padding(tokenizer_dir):
    tok = OPTTokenizer.from_pretrained(tokenizer_dir)
    ids, mask = tok.encode_batch(["a", "a much longer prompt"])
    assert ids.dtype == np.int32 and ids.shape == mask.shape
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and ids[0, 0] == 1
    assert ids[1].tolist() == tok.encode("a much longer prompt")
    right, _ = tok.encode_batch(["a", "a much longer prompt"], padding_side="right")
    assert right[0, -1] == 1 and right[0, 0] == 2


def test_bad_tokenizers_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        OPTTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab_size 100 is too small"):
        opt_jax.train_tokenizer(["abc"], vocab_size=100)
    from tokenizers import Tokenizer, models

    gpt2_like = Tokenizer(
        models.BPE(vocab={"a": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<s>": 4}, merges=[])
    )
    with pytest.raises(ValueError, match="special token <s> has id 4, OPT requires 0"):
        OPTTokenizer(gpt2_like)


def test_incremental_decoding_equals_decoding_everything(tokenizer_dir):
    """Token by token, the incremental text is always a prefix of decoding every id so far, and
    equals the whole decode after finish(), on sequences that split multi-byte characters
    across tokens and on random ids (invalid UTF-8 among them)."""
    tok = OPTTokenizer.from_pretrained(tokenizer_dir)
    rng = np.random.default_rng(0)
    text = "é ü 日本 — 🙂 naïve, Größe: ∑ x² " * 3
    split = [tok.encode(ch, add_prefix=False) for ch in text]  # one character's bytes per list
    assert any(len(ids) > 1 for ids in split)  # characters whose bytes span several tokens
    sequences = [[i for ids in split for i in ids], tok.encode(text)]
    sequences += [rng.integers(0, tok.vocab_size, 60).tolist() for _ in range(20)]
    for ids in sequences:
        decoder = opt_jax.IncrementalDecoder(tok)
        pieces = []
        for n, i in enumerate(ids, start=1):
            pieces.append(decoder.push(i))
            assert tok.decode(ids[:n]).startswith(decoder.text)
        pieces.append(decoder.finish())
        assert decoder.text == "".join(pieces) == tok.decode(ids)
    assert opt_jax.IncrementalDecoder(tok).finish() == ""


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
