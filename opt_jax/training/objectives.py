"""What a run learns: the objective, its data and its evaluation, one class per task.

`config.task` picks one: "lm" (causal language modelling on packed text, every config but
two), "classification" (configs/classify.py) or "qa" (configs/qa.py). The training loop asks a
task for:

  architecture            the head (OPTConfig.architecture) it trains
  tokenizer, train        the tokenizer and the training dataset (batches by step)
  loss(outputs, batch)    (mean, count), traced inside the jitted step
  eval_outputs(outputs, batch)  what an evaluation batch returns to the host (traced)
  evaluate(predict, workdir)    metrics from `predict(local batch) -> host arrays`
  label_names             the classification head's classes (others: ())
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import optax

from opt_jax.losses import causal_lm_loss
from opt_jax.tasks import builtin, classification, squad
from opt_jax.tokenizer import OPTTokenizer
from opt_jax.training import data

TASKS = ("lm", "classification", "qa")
ARCHITECTURES = {
    "lm": "OPTForCausalLM",
    "classification": "OPTForSequenceClassification",
    "qa": "OPTForQuestionAnswering",
}


# The data fields each task reads (configs/classify.py and configs/qa.py define them).
FIELDS = {
    "lm": (),
    "classification": ("train_file", "eval_file", "text_field", "text_pair_field", "label_field"),
    "qa": ("train_file", "eval_file", "doc_stride", "max_answer_length", "n_best_size"),
}


def build(config, workdir: str, resuming: bool):
    """The task object of `config.task`, its data read and checked."""
    name = config.get("task", "lm")
    if name not in TASKS:
        raise ValueError(f"config.task {name!r} is not one of {TASKS}")
    missing = [f"data.{f}" for f in FIELDS[name] if f not in config.data]
    if missing:
        source = {"classification": "configs/classify.py", "qa": "configs/qa.py"}[name]
        raise ValueError(
            f"config.task={name!r} needs {', '.join(missing)}, which this config lacks: "
            f"start from {source}"
        )
    return {"lm": LanguageModelling, "classification": Classification, "qa": QuestionAnswering}[
        name
    ](config, workdir, resuming)


def _process_slice(rows: dict, process_index: int, process_count: int) -> dict:
    local = len(next(iter(rows.values()))) // process_count
    return {k: v[process_index * local : (process_index + 1) * local] for k, v in rows.items()}


def _predict_all(predict, arrays: dict, batch_size: int) -> list:
    """Runs `predict` over every row of `arrays` in global batches of `batch_size` (the last
    one padded by repeating its first row) and returns the outputs of the real rows."""
    n = len(next(iter(arrays.values())))
    pieces = []
    for begin in range(0, n, batch_size):
        index = np.arange(begin, begin + batch_size)
        index = np.where(index < n, index, begin)
        batch = _process_slice(
            {k: v[index] for k, v in arrays.items()}, jax.process_index(), jax.process_count()
        )
        real = min(batch_size, n - begin)
        pieces.append(jax.tree.map(lambda x, real=real: np.asarray(x)[:real], predict(batch)))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)


def _tokenizer(config) -> OPTTokenizer:
    source = data.tokenizer_source(config)
    if not source:
        raise ValueError(
            f"config.task={config.task!r} fine-tunes a pretrained model: set init_from (an HF "
            "directory or our export with a tokenizer) or data.tokenizer"
        )
    return OPTTokenizer.from_pretrained(source)


def _builtin_files(config, workdir: str, write) -> tuple[str, str]:
    """data.train_file / data.eval_file, or the built-in task's files (written into
    WORKDIR/data when both are "builtin")."""
    train, evaluation = config.data.train_file, config.data.eval_file
    if (train == "builtin") != (evaluation == "builtin"):
        raise ValueError(
            "data.train_file and data.eval_file must both be 'builtin' or both name files"
        )
    if train == "builtin":
        return write(os.path.join(workdir, "data"))
    for field, path in (("train_file", train), ("eval_file", evaluation)):
        if not os.path.isfile(path):
            raise ValueError(f"data.{field} {path!r} is not a file")
    return train, evaluation


class LanguageModelling:
    """Next-token prediction on packed sequences of a corpus (training/data.py)."""

    architecture = ARCHITECTURES["lm"]
    label_names: tuple[str, ...] = ()
    generates = True  # periodic samples, and an orbax export for generate.py

    def __init__(self, config, workdir: str, resuming: bool):
        self.config = config
        if data.uses_stores(config):  # token stores, memory-mapped (opt_jax.data)
            self.tokenizer, self.train, self.eval = data.store_datasets(
                config, verify=jax.process_index() == 0 and config.data.verify_store
            )
            self.sizes = tuple(sum(s.num_tokens for s in m.stores) for m in (self.train, self.eval))
            return
        self.tokenizer, train_tokens, eval_tokens = data.prepare(config, workdir, resuming)
        self.sizes = (len(train_tokens), len(eval_tokens))
        self.train = data.PackedDataset(
            train_tokens, config.seq_len, config.batch_size, config.seed
        )
        self.eval = data.PackedDataset(
            eval_tokens, config.seq_len, config.batch_size, config.seed + 1
        )

    def token_arrays(self) -> dict:
        if isinstance(self.train, data.Mixture):  # ids are < the store tokenizer's vocabulary
            return {"the stores' largest token id": np.array([[self.tokenizer.vocab_size - 1]])}
        return {"training tokens": self.train.examples, "evaluation tokens": self.eval.examples}

    def describe(self) -> str:
        source = self.config.data.source
        source = "the standard library's sources" if source == "stdlib" else source
        if isinstance(self.train, data.Mixture):
            weights = self.train.weights
            source = (
                "token store"
                + "s" * (len(weights) > 1)
                + " "
                + ", ".join(
                    f"{name} ({w / sum(weights):.0%})"
                    for name, w in zip(self.train.names, weights, strict=True)
                )
            )
        return (
            f"{source}: {self.sizes[0] / 1e6:.1f}M training and {self.sizes[1] / 1e6:.2f}M "
            "held-out tokens"
        )

    @staticmethod
    def loss(outputs, batch):
        return causal_lm_loss(outputs.logits, batch["input_ids"], batch["attention_mask"])

    def eval_outputs(self, outputs, batch):
        mean, count = self.loss(outputs, batch)
        return mean * count, count

    def evaluate(self, predict, workdir: str) -> dict:
        total = count = 0.0
        for i in range(self.config.eval_batches):
            loss_sum, n = predict(self.eval.batch(i, jax.process_index(), jax.process_count()))
            total, count = total + float(loss_sum), count + float(n)
        loss = total / max(count, 1.0)
        return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0)))}


class Classification:
    """Sequence classification of JSON Lines records (opt_jax/tasks/classification.py):
    cross-entropy of the head at the last token; eval_loss, eval_accuracy, macro eval_f1."""

    architecture = ARCHITECTURES["classification"]
    generates = False

    def __init__(self, config, workdir: str, resuming: bool):
        d = config.data
        self.config = config
        self.tokenizer = _tokenizer(config)
        train_file, eval_file = _builtin_files(config, workdir, builtin.write_classification)
        fields = (d.text_field, d.text_pair_field, d.label_field)
        train_records = classification.read_jsonl(train_file, *fields)
        eval_records = classification.read_jsonl(eval_file, *fields)
        self.label_names = classification.label_names(train_records)
        encode = lambda records: classification.encode(  # noqa: E731
            self.tokenizer, records, self.label_names, config.seq_len, train_file=train_file
        )
        self.eval_arrays = encode(eval_records)
        self.train = data.ArrayDataset(encode(train_records), config.batch_size, config.seed)
        self.files = (train_file, eval_file)

    def token_arrays(self) -> dict:
        return {"training texts": self.train.arrays["input_ids"],
                "evaluation texts": self.eval_arrays["input_ids"]}  # fmt: skip

    def describe(self) -> str:
        return (
            f"{self.files[0]}: {self.train.num_examples} training and "
            f"{len(self.eval_arrays['labels'])} evaluation texts, labels "
            + ", ".join(self.label_names)
        )

    @staticmethod
    def loss(outputs, batch):
        losses = optax.softmax_cross_entropy_with_integer_labels(outputs.logits, batch["labels"])
        return losses.mean(), np.float32(losses.shape[0])

    def eval_outputs(self, outputs, batch):
        return outputs.logits

    def evaluate(self, predict, workdir: str) -> dict:
        logits = _predict_all(predict, self.eval_arrays, self.config.batch_size)
        return classification.metrics(logits, self.eval_arrays["labels"])


class QuestionAnswering:
    """Extractive QA on SQuAD-format files (opt_jax/tasks/squad.py): the mean of the start and
    end cross-entropies, as HF's OPTForQuestionAnswering; eval_exact_match / eval_f1 (0-100)
    and WORKDIR/predictions.json."""

    architecture = ARCHITECTURES["qa"]
    label_names: tuple[str, ...] = ()
    generates = False

    def __init__(self, config, workdir: str, resuming: bool):
        d = config.data
        self.config = config
        self.tokenizer = _tokenizer(config)
        train_file, eval_file = _builtin_files(config, workdir, builtin.write_squad)
        train_examples, train_v2 = squad.read_squad(train_file)
        self.examples, eval_v2 = squad.read_squad(eval_file)
        self.version_2 = train_v2 or eval_v2
        window = lambda examples, source: squad.features(  # noqa: E731
            self.tokenizer, examples, config.seq_len, d.doc_stride, source=source
        )
        self.train = data.ArrayDataset(
            window(train_examples, train_file).arrays, config.batch_size, config.seed
        )
        self.features = window(self.examples, eval_file)
        self.files = (train_file, eval_file)
        self.counts = (len(train_examples), len(self.examples))

    def token_arrays(self) -> dict:
        return {"training windows": self.train.arrays["input_ids"],
                "evaluation windows": self.features.arrays["input_ids"]}  # fmt: skip

    def describe(self) -> str:
        version = "v2.0" if self.version_2 else "v1.1"
        return (
            f"{self.files[0]} (SQuAD {version}): {self.counts[0]} training questions in "
            f"{self.train.num_examples} windows, {self.counts[1]} evaluation questions"
        )

    @staticmethod
    def loss(outputs, batch):
        start = optax.softmax_cross_entropy_with_integer_labels(
            outputs.start_logits, batch["start_positions"]
        )
        end = optax.softmax_cross_entropy_with_integer_labels(
            outputs.end_logits, batch["end_positions"]
        )
        return ((start + end) / 2).mean(), np.float32(start.shape[0])

    def eval_outputs(self, outputs, batch):
        return outputs.start_logits, outputs.end_logits

    def evaluate(self, predict, workdir: str) -> dict:
        arrays = self.features.arrays
        starts, ends = _predict_all(predict, arrays, self.config.batch_size)
        loss = (
            classification.cross_entropy(starts, arrays["start_positions"])
            + classification.cross_entropy(ends, arrays["end_positions"])
        ) / 2
        predictions = squad.postprocess(
            self.examples,
            self.features,
            starts,
            ends,
            version_2=self.version_2,
            n_best=self.config.data.n_best_size,
            max_answer_length=self.config.data.max_answer_length,
        )
        if jax.process_index() == 0:
            path = os.path.join(workdir, "predictions.json")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(predictions, f, indent=1, ensure_ascii=False)
            os.replace(path + ".tmp", path)
        scores = squad.score(self.examples, predictions)
        return {
            "eval_loss": float(loss.mean()),
            "eval_exact_match": scores["exact_match"],
            "eval_f1": scores["f1"],
        }
