"""OPT's tokenizer contract on top of the `tokenizers` library.

OPT uses GPT-2's byte-level BPE with fairseq's special tokens first (`<s>` 0, `<pad>` 1,
`</s>` 2, `<unk>` 3) and prepends `</s>` (id 2) to every prompt, as transformers' OPT tokenizer
does. We apply that prefix ourselves (never twice) instead of trusting whatever post-processor a
tokenizer.json carries.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
# fairseq's dictionary order: these ids are part of every OPT checkpoint.
SPECIAL_TOKENS = (BOS, PAD, EOS, UNK)
# OPT's prompt prefix is `</s>` (bos_token_id = eos_token_id = 2), not `<s>`.
PROMPT_PREFIX = EOS


def _byte_level(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


class OPTTokenizer:
    """Byte-level BPE with OPT's special tokens and `</s>` prompt prefix.

    Attributes:
      bos_token_id / eos_token_id: 2 (`</s>`); pad_token_id: 1.
      vocab_size: number of ids the tokenizer can produce (50265 for real OPT: fewer than the
        model's 50272 embedding rows).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        for token, expected in zip(SPECIAL_TOKENS, range(4), strict=True):
            if ids[token] != expected:
                raise ValueError(
                    f"not an OPT tokenizer: special token {token} has id {ids[token]}, "
                    f"OPT requires {expected}"
                )
        # Make sure the specials are split out of text and skippable on decode.
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
        self.bos_token_id = ids[PROMPT_PREFIX]
        self.eos_token_id = ids[EOS]
        self.pad_token_id = ids[PAD]
        self.unk_token_id = ids[UNK]

    # -- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> OPTTokenizer:
        """Loads tokenizer.json, or else vocab.json + merges.txt, from an HF directory."""
        directory = os.fspath(directory)
        tokenizer_json = os.path.join(directory, "tokenizer.json")
        vocab = os.path.join(directory, "vocab.json")
        merges = os.path.join(directory, "merges.txt")
        if os.path.isfile(tokenizer_json):
            return cls(Tokenizer.from_file(tokenizer_json))
        if os.path.isfile(vocab) and os.path.isfile(merges):
            return cls(_byte_level(Tokenizer(models.BPE.from_file(vocab, merges))))
        raise FileNotFoundError(
            f"no tokenizer in {directory}: expected tokenizer.json or vocab.json + merges.txt"
        )

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's full definition (vocabulary, merges, normalisation)."""
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()

    def save(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json, vocab.json, merges.txt and the HF tokenizer configs."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        # A post-processor that prepends `</s>`, so transformers' fast tokenizer loading this
        # tokenizer.json follows OPT's contract too. (We never run it: see `encode`.)
        self._tok.post_processor = processors.TemplateProcessing(
            single=f"{PROMPT_PREFIX} $A",
            pair=f"{PROMPT_PREFIX} $A {PROMPT_PREFIX} $B",
            special_tokens=[(PROMPT_PREFIX, self.bos_token_id)],
        )
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        self._tok.model.save(directory)  # vocab.json + merges.txt
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_bos_token": True,
            "add_prefix_space": False,
            "bos_token": PROMPT_PREFIX,
            "eos_token": EOS,
            "unk_token": UNK,
            "pad_token": PAD,
            "errors": "replace",
            "model_max_length": 2048,
        }
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        specials = {
            "bos_token": PROMPT_PREFIX,
            "eos_token": EOS,
            "unk_token": UNK,
            "pad_token": PAD,
        }
        with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
            json.dump(specials, f, indent=2)

    # -- encoding and decoding ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_prefix: bool = True) -> list[int]:
        """Text -> ids, with `</s>` prepended exactly once when add_prefix."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_prefix and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def encode_batch(
        self, texts: Sequence[str], *, add_prefix: bool = True, padding_side: str = "left"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (input_ids [B, T] int32, attention_mask [B, T] int32), padded with <pad>.

        Left padding (the default) is what generation wants: every row ends at the same slot.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if isinstance(texts, str) or not texts:
            raise ValueError("encode_batch takes a non-empty list of strings")
        rows = [self.encode(t, add_prefix=add_prefix) for t in texts]
        length = max(len(r) for r in rows)
        ids = np.full((len(rows), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            span = (
                slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
            )
            ids[i, span] = row
            mask[i, span] = 1
        return ids, mask

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        # Ids past the tokenizer (OPT's 7 padding rows of the embedding) decode to nothing.
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, *, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class IncrementalDecoder:
    """The text of a growing sequence of token ids, decoded as the tokens arrive.

    Streaming (scripts, the server) used to decode every token so far at each step: quadratic in
    the length of a completion. This decodes only the tokens since the last complete
    character. A byte-level BPE token can end inside a multi-byte UTF-8 character (its text
    then ends in U+FFFD); such tokens wait until a later token completes the character, or
    until `finish`. After `finish`, `text` equals `tokenizer.decode(all ids)`; before it,
    `text` is a prefix of that (tested). Why it is exact: UTF-8 sequences are self-delimiting,
    and a decoded piece that does not end in U+FFFD ends on a character boundary. So each piece
    starts on a character boundary, and the pieces decode as the whole sequence would.
    """

    def __init__(self, tokenizer: OPTTokenizer, *, skip_special_tokens: bool = True):
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._pending: list[int] = []  # ids whose text is not in `text` yet
        self.text = ""

    def push(self, token: int) -> str:
        """Adds one id; returns the text it completes (often "", for a partial character)."""
        self._pending.append(int(token))
        piece = self._tokenizer.decode(self._pending, skip_special_tokens=self._skip)
        if piece.endswith("\ufffd"):
            return ""
        self._pending.clear()
        self.text += piece
        return piece

    def finish(self) -> str:
        """Decodes what is pending as it stands (an incomplete character as U+FFFD)."""
        piece = self._tokenizer.decode(self._pending, skip_special_tokens=self._skip)
        self._pending.clear()
        self.text += piece
        return piece


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2
) -> OPTTokenizer:
    """Trains a byte-level BPE with OPT's special-token layout (`<s>` 0 … `<unk>` 3).

    Args:
      texts: an iterable of training strings (documents or lines).
      vocab_size: the total number of ids, special tokens and the 256 byte symbols included.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{len(SPECIAL_TOKENS) + 256} ids (4 special tokens + 256 bytes)"
        )
    tokenizer = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return OPTTokenizer(tokenizer)
