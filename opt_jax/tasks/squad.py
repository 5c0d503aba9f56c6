"""Extractive question answering on SQuAD-format data: windows, span labels, n-best answers and
the official exact-match / F1.

Data is SQuAD v1.1 / v2.0 JSON as published (`data[].paragraphs[].{context, qas[]}`, each
question with `id`, `question`, `answers[{text, answer_start}]` and, in v2.0, `is_impossible`).
A file whose questions carry `is_impossible` is v2.0: questions may have no answer, and the
model may answer "" (the empty span at position 0, the `</s>` prefix, as HF's run_qa uses the
first token for models without a CLS token).

Features follow HF's run_qa recipe: `</s> question </s> context-window`, right-padded to
`seq_len`; a context longer than one window is split into windows overlapping by `doc_stride`
tokens. Answers map to token spans through the tokenizer's character offsets. At evaluation
the `n_best` highest start and end logits of every window are paired (start <= end, at most
`max_answer_length` tokens, inside the context), the best span over all windows of a question
wins, and in v2.0 the empty answer wins when its score (start + end logit at position 0,
lowest over windows) beats the best span. Scores use the official evaluation script's
normalisation (lower case, no punctuation, no articles, single spaces), 0-100 scale.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import string

import numpy as np

from opt_jax.tokenizer import OPTTokenizer


@dataclasses.dataclass(frozen=True)
class Example:
    """One question: id, texts, gold answers [(text, character start)], and whether v2.0
    marks it unanswerable."""

    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    is_impossible: bool


def read_squad(path: str) -> tuple[list[Example], bool]:
    """Reads a SQuAD-format JSON file.

    Returns:
      (examples, version_2): version_2 when the questions carry `is_impossible`.

    Raises:
      ValueError: naming the file, the question id and the field that is missing or wrong,
        including an answer whose text is not at its `answer_start` in the context.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read QA data {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise ValueError(f"{path}: not SQuAD format (no top-level 'data' list)")
    examples, version_2, seen = [], False, set()
    for a, article in enumerate(raw["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = paragraph.get("context")
            if not isinstance(context, str) or not context.strip():
                raise ValueError(f"{where}: field 'context' is missing or empty")
            for qa in paragraph.get("qas", []):
                qid = qa.get("id")
                if not isinstance(qid, str) or not qid:
                    raise ValueError(f"{where}: a question has no 'id'")
                if qid in seen:
                    raise ValueError(f"{path}: question id {qid!r} appears twice")
                seen.add(qid)
                question = qa.get("question")
                if not isinstance(question, str) or not question.strip():
                    raise ValueError(f"{path}: question {qid!r}: field 'question' is missing")
                impossible = bool(qa.get("is_impossible", False))
                version_2 |= "is_impossible" in qa
                answers = []
                for k, answer in enumerate(qa.get("answers", [])):
                    text, start = answer.get("text"), answer.get("answer_start")
                    if not isinstance(text, str) or not isinstance(start, int):
                        raise ValueError(
                            f"{path}: question {qid!r}: answers[{k}] needs 'text' (a string) "
                            "and 'answer_start' (an integer)"
                        )
                    if context[start : start + len(text)] != text:
                        found = context.find(text)
                        hint = f" (it occurs at {found})" if found >= 0 else " (nor anywhere)"
                        raise ValueError(
                            f"{path}: question {qid!r}: answers[{k}] {text!r} is not at "
                            f"answer_start {start} of its context{hint}"
                        )
                    answers.append((text, start))
                if not answers and not impossible:
                    raise ValueError(
                        f"{path}: question {qid!r}: no 'answers' and not marked is_impossible"
                    )
                examples.append(
                    Example(qid, question.lstrip(), context, tuple(answers), impossible)
                )
    if not examples:
        raise ValueError(f"QA data {path} holds no questions")
    return examples, version_2


@dataclasses.dataclass
class Features:
    """Model inputs of every window and what post-processing needs to map logits back.

    arrays: input_ids / attention_mask [F, T] int32, start_positions / end_positions [F] int32
      (the first answer's token span in the window, 0 / 0 when it is not inside or there is
      none).
    example: [F] index of each window's question.
    context_start: [F] position in the row of the window's first context token.
    token_start: [F] index (into the context's tokens) of that first token.
    length: [F] context tokens in the window.
    offsets: per question, [num context tokens, 2] character spans (leading spaces trimmed).
    """

    arrays: dict[str, np.ndarray]
    example: np.ndarray
    context_start: np.ndarray
    token_start: np.ndarray
    length: np.ndarray
    offsets: list[np.ndarray]


def _trimmed_offsets(context: str, offsets) -> np.ndarray:
    """Character spans of tokens, with the leading whitespace byte-level BPE folds into a
    token ("Ġword") left out, so answers come out without it."""
    spans = np.asarray(offsets, np.int64).reshape(-1, 2).copy()
    for span in spans:
        while span[0] < span[1] and context[span[0]].isspace():
            span[0] += 1
    return spans


def _token_span(offsets: np.ndarray, start: int, end: int) -> tuple[int, int] | None:
    """First and last token overlapping the character span [start, end), or None."""
    overlaps = np.nonzero((offsets[:, 1] > start) & (offsets[:, 0] < end))[0]
    if overlaps.size == 0:
        return None
    return int(overlaps[0]), int(overlaps[-1])


def features(
    tokenizer: OPTTokenizer,
    examples: list[Example],
    seq_len: int,
    doc_stride: int,
    *,
    source: str = "QA data",
) -> Features:
    """Splits every question's context into windows (see the module docstring).

    Raises:
      ValueError: a question so long that no window has room for `doc_stride` + 1 context
        tokens (named), or a doc_stride that is negative.
    """
    if doc_stride < 0:
        raise ValueError(f"data.doc_stride must be >= 0, got {doc_stride}")
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    questions = tokenizer._tok.encode_batch(
        [e.question for e in examples], add_special_tokens=False
    )
    contexts = {}  # contexts are shared by several questions: tokenize each once
    for e in examples:
        contexts.setdefault(e.context, None)
    encoded = tokenizer._tok.encode_batch(list(contexts), add_special_tokens=False)
    for text, enc in zip(list(contexts), encoded, strict=True):
        contexts[text] = (np.asarray(enc.ids, np.int32), _trimmed_offsets(text, enc.offsets))

    rows, meta, all_offsets = [], [], []
    for index, (example, question) in enumerate(zip(examples, questions, strict=True)):
        q = question.ids
        room = seq_len - 2 - len(q)
        if room <= doc_stride:
            raise ValueError(
                f"{source}: question {example.id!r} takes {len(q)} tokens, leaving {room} "
                f"context tokens per window of seq_len {seq_len}; a window needs more than "
                f"data.doc_stride={doc_stride}: raise seq_len or lower doc_stride"
            )
        ids, offsets = contexts[example.context]
        all_offsets.append(offsets)
        span = None
        if example.answers and not example.is_impossible:
            text, start = example.answers[0]
            span = _token_span(offsets, start, start + len(text))
        first = 0
        while True:
            window = ids[first : first + room]
            row = [bos, *q, bos, *window.tolist()]
            context_start = len(q) + 2
            label = (0, 0)
            if span is not None and first <= span[0] and span[1] < first + len(window):
                label = (context_start + span[0] - first, context_start + span[1] - first)
            rows.append((row, label))
            meta.append((index, context_start, first, len(window)))
            if first + room >= len(ids):
                break
            first += room - doc_stride
    n = len(rows)
    arrays = {
        "input_ids": np.full((n, seq_len), pad, np.int32),
        "attention_mask": np.zeros((n, seq_len), np.int32),
        "start_positions": np.zeros((n,), np.int32),
        "end_positions": np.zeros((n,), np.int32),
    }
    for i, (row, (start, end)) in enumerate(rows):
        arrays["input_ids"][i, : len(row)] = row
        arrays["attention_mask"][i, : len(row)] = 1
        arrays["start_positions"][i], arrays["end_positions"][i] = start, end
    example, context_start, token_start, length = np.array(meta, np.int32).T
    return Features(arrays, example, context_start, token_start, length, all_offsets)


def postprocess(
    examples: list[Example],
    feats: Features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    version_2: bool,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """Logits of every window -> {question id: answer text} (see the module docstring).

    Args:
      start_logits / end_logits: [F, T] per window.
    """
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for f in range(len(feats.example)):
        index = int(feats.example[f])
        offsets = feats.offsets[index]
        lo = int(feats.context_start[f])
        hi = lo + int(feats.length[f])
        starts, ends = start_logits[f], end_logits[f]
        score_null = float(starts[0] + ends[0])
        null[index] = min(null.get(index, score_null), score_null)
        top_starts = lo + np.argsort(-starts[lo:hi], kind="stable")[:n_best]
        top_ends = lo + np.argsort(-ends[lo:hi], kind="stable")[:n_best]
        context = examples[index].context
        for i in top_starts:
            for j in top_ends:
                if j < i or j - i + 1 > max_answer_length:
                    continue
                score = float(starts[i] + ends[j])
                if index in best and score <= best[index][0]:
                    continue
                a = offsets[feats.token_start[f] + i - lo][0]
                b = offsets[feats.token_start[f] + j - lo][1]
                if b <= a:  # a whitespace-only span
                    continue
                best[index] = (score, context[a:b])
    predictions = {}
    for index, example in enumerate(examples):
        score, text = best.get(index, (-np.inf, ""))
        if version_2 and null.get(index, -np.inf) > score:
            text = ""
        predictions[example.id] = text
    return predictions


# -- The official SQuAD evaluation (v2.0 script's definitions; v1.1 gives the same numbers) --
def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    predicted, golden = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not golden:  # an empty answer scores 1 only against an empty one
        return float(predicted == golden)
    common = sum((collections.Counter(predicted) & collections.Counter(golden)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(golden)
    return 2 * precision * recall / (precision + recall)


def score(examples: list[Example], predictions: dict[str, str]) -> dict[str, float]:
    """{"exact_match", "f1"} on the 0-100 scale: each question scores its best gold answer
    (unanswerable questions have the gold answer "")."""
    em = f1_total = 0.0
    for example in examples:
        golds = [t for t, _ in example.answers if normalize_answer(t)] or [""]
        prediction = predictions.get(example.id, "")
        em += max(exact_match(prediction, g) for g in golds)
        f1_total += max(f1(prediction, g) for g in golds)
    n = max(len(examples), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1_total / n}
