"""Text classification data: JSON Lines records -> token rows, label ids, and the metrics.

A record is one JSON object per line with a text field, optionally a second text (a pair, as
in NLI or paraphrase tasks) and a label (an integer or a string). Rows are what
OPTForSequenceClassification reads: `</s> text` or `</s> text </s> pair` (the pair template
our saved tokenizer.json declares, as transformers' OPT tokenizer builds pairs), right-padded
with `<pad>` to `seq_len`; the head reads the last non-pad token, as HF's does. Texts longer
than the row are truncated from the end, the longer of a pair first (HF's "longest_first").
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from opt_jax.tokenizer import OPTTokenizer


@dataclasses.dataclass(frozen=True)
class Record:
    """One example: where it came from (file:line), its text(s) and its label as written."""

    where: str
    text: str
    pair: str | None
    label: int | str


def read_jsonl(path: str, text_field: str, pair_field: str, label_field: str) -> list[Record]:
    """Reads classification records, checking every field.

    Args:
      pair_field: "" for single texts.

    Raises:
      ValueError: naming the file, the line and the field that is missing or malformed.
    """
    records = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read classification data {path}: {e.strerror}") from e
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON object ({e.msg})") from e
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: not a JSON object")
            fields = [text_field, label_field] + ([pair_field] if pair_field else [])
            for field in fields:
                if field not in raw:
                    raise ValueError(f"{where}: no field {field!r} (has {sorted(raw)})")
            texts = [raw[text_field]] + ([raw[pair_field]] if pair_field else [])
            for field, value in zip(fields[:1] + fields[2:], texts, strict=True):
                if not isinstance(value, str):
                    raise ValueError(f"{where}: field {field!r} must be a string, got {value!r}")
            label = raw[label_field]
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise ValueError(
                    f"{where}: field {label_field!r} must be an integer or a string, got {label!r}"
                )
            records.append(Record(where, texts[0], texts[1] if pair_field else None, label))
    if not records:
        raise ValueError(f"classification data {path} holds no records")
    return records


def label_names(records: list[Record]) -> tuple[str, ...]:
    """The label vocabulary of the training records, in id order: integers sorted numerically
    (so labels 0..K-1 keep their ids), strings alphabetically. Names are strings (config.json's
    id2label)."""
    kinds = {type(r.label) for r in records}
    if len(kinds) > 1:
        first = {kind: next(r for r in records if type(r.label) is kind) for kind in kinds}
        raise ValueError(
            "labels mix integers and strings: "
            + ", ".join(f"{r.where} has {r.label!r}" for r in first.values())
        )
    values = sorted({r.label for r in records})
    if len(values) < 2:
        raise ValueError(
            f"the training data has {len(values)} distinct label(s) {values}: classification "
            "needs at least 2"
        )
    return tuple(str(v) for v in values)


def _fit(a: int, b: int, budget: int) -> tuple[int, int]:
    """Lengths of a pair after removing tokens from the longer side until both fit."""
    while a + b > budget:
        if a >= b:
            a -= 1
        else:
            b -= 1
    return a, b


def encode(
    tokenizer: OPTTokenizer,
    records: list[Record],
    names: tuple[str, ...],
    seq_len: int,
    *,
    train_file: str = "the training data",
) -> dict[str, np.ndarray]:
    """Records -> {"input_ids", "attention_mask": [N, seq_len] int32, "labels": [N] int32}.

    Raises:
      ValueError: a record whose label the training data does not have (named).
    """
    ids_of = {name: i for i, name in enumerate(names)}
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    firsts = tokenizer._tok.encode_batch([r.text for r in records], add_special_tokens=False)
    pairs = [r.pair for r in records]
    seconds = (
        tokenizer._tok.encode_batch(pairs, add_special_tokens=False)
        if pairs and pairs[0] is not None
        else [None] * len(records)
    )
    n = len(records)
    out = {
        "input_ids": np.full((n, seq_len), pad, np.int32),
        "attention_mask": np.zeros((n, seq_len), np.int32),
        "labels": np.zeros((n,), np.int32),
    }
    for i, (record, first, second) in enumerate(zip(records, firsts, seconds, strict=True)):
        label = str(record.label)
        if label not in ids_of:
            raise ValueError(
                f"{record.where}: label {record.label!r} does not occur in {train_file} "
                f"(its labels: {', '.join(names)})"
            )
        if second is None:
            row = [bos] + first.ids[: seq_len - 1]
        else:
            a, b = _fit(len(first.ids), len(second.ids), seq_len - 2)
            row = [bos] + first.ids[:a] + [bos] + second.ids[:b]
        out["input_ids"][i, : len(row)] = row
        out["attention_mask"][i, : len(row)] = 1
        out["labels"][i] = ids_of[label]
    return out


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N] cross-entropy of [N, C] logits against [N] integer labels (float64, on the host)."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels]


def metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 (fractions in [0, 1]) and the mean cross-entropy.

    Macro F1 averages the per-class F1 over the classes that occur among the labels or the
    predictions (scikit-learn's f1_score(average="macro") convention).

    Args:
      logits: [N, num_labels] float.
      labels: [N] int.
    """
    predicted = np.asarray(logits).argmax(-1)
    loss = cross_entropy(logits, labels).mean()
    f1s = []
    for c in np.union1d(labels, predicted):
        tp = np.sum((predicted == c) & (labels == c))
        fp = np.sum((predicted == c) & (labels != c))
        fn = np.sum((predicted != c) & (labels == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {
        "eval_loss": float(loss),
        "eval_accuracy": float(np.mean(predicted == labels)),
        "eval_f1": float(np.mean(f1s)),
    }
