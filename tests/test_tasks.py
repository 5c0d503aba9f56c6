"""Task fine-tuning: classification (configs/classify.py) and extractive QA (configs/qa.py)
through scripts/train.py's loop, their data formats, metrics and errors, exports that
transformers loads, and LoRA with the task head trained in full (PEFT's modules_to_save)."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

import opt_jax
from opt_jax.tasks import builtin, classification, squad

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta red blue green good bad movie plot actor what is the".split()


def _config(name: str, tmp_path, base: str, **overrides):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert f"scripts/train.py --config configs/{name}.py" in module.__doc__
    c = module.get_config()
    c.init_from = base
    c.batch_size, c.seq_len = 8, 32
    c.log_every_steps, c.keep_checkpoints = 5, 1
    c.model.dropout = 0.0
    for key, value in overrides.items():
        target = c
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return c


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny OPT language model (HF layout) with a tokenizer that knows the tasks' words."""
    directory = tmp_path_factory.mktemp("base")
    corpus = [" ".join(WORDS)] * 50 + ["alpha is red. beta is blue? What is gamma?"] * 50
    tokenizer = opt_jax.train_tokenizer(corpus, 300)
    config = opt_jax.OPTConfig(vocab_size=304, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                               num_attention_heads=2, max_position_embeddings=64,
                               dropout=0.0)  # fmt: skip
    opt_jax.save_pretrained(directory, config, opt_jax.init_params(config, 0))
    tokenizer.save(directory)
    return str(directory)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sentiment(tmp_path, n_train=96, n_dev=32):
    """An easy 2-class task: "good" in the text -> pos, "bad" -> neg."""
    rng = np.random.default_rng(0)

    def rows(n):
        out = []
        for i in range(n):
            label = ["neg", "pos"][i % 2]
            words = list(rng.choice(WORDS[:8], size=5)) + [["bad", "good"][i % 2]]
            rng.shuffle(words)
            out.append({"text": " ".join(words), "label": label})
        return out

    return (_write_jsonl(tmp_path / "train.jsonl", rows(n_train)),
            _write_jsonl(tmp_path / "dev.jsonl", rows(n_dev)))  # fmt: skip


def _squad_file(path, n_paragraphs, seed, version_2=True):
    """Contexts "alpha is red. beta is blue. ..." (long enough for several windows); questions
    "What is beta?" -> "blue", and in v2.0 one unanswerable question per context."""
    rng = np.random.default_rng(seed)
    names, colours = WORDS[:4] + ["movie", "plot"], ["red", "blue", "green", "good", "bad"]
    paragraphs = []
    for p in range(n_paragraphs):
        chosen = list(rng.permutation(names))
        present, absent = chosen[:5], chosen[5]
        context, qas = "", []
        for name in present:
            colour = str(rng.choice(colours))
            qas.append({"id": f"{p}-{name}", "question": f"What is {name}?",
                        "answers": [{"text": colour, "answer_start": len(context) + len(name) + 4}],
                        "is_impossible": False})  # fmt: skip
            context += f"{name} is {colour}. "
        if version_2:
            qas.append({"id": f"{p}-none", "question": f"What is {absent}?", "answers": [],
                        "is_impossible": True})  # fmt: skip
        else:
            for q in qas:
                del q["is_impossible"]
        paragraphs.append({"context": context, "qas": qas})
    path.write_text(json.dumps({"version": "v2.0", "data": [{"paragraphs": paragraphs}]}))
    return str(path)


def _metrics(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


# -- Data, metrics and post-processing -----------------------------------------------------------
def test_squad_metric_is_the_official_definition():
    assert squad.normalize_answer("The  Cat, sat!") == "cat sat"
    assert squad.exact_match("the cat", "Cat") == 1.0
    # pred tokens [cat, sat, down], gold [cat, sat]: precision 2/3, recall 1 -> F1 0.8
    assert squad.f1("cat sat down", "a cat sat") == pytest.approx(0.8)
    assert squad.f1("", "") == 1.0 and squad.f1("x", "") == 0.0 and squad.f1("dog", "cat") == 0.0
    examples = [
        squad.Example("a", "q", "c", (("red", 0), ("dark red", 0)), False),
        squad.Example("b", "q", "c", (), True),
    ]
    scores = squad.score(examples, {"a": "dark red!", "b": "something"})
    assert scores == pytest.approx({"exact_match": 50.0, "f1": 50.0})


def test_windows_map_answers_to_tokens_and_postprocess_recovers_them(base, tmp_path):
    tokenizer = opt_jax.OPTTokenizer.from_pretrained(base)
    path = _squad_file(tmp_path / "qa.json", 3, seed=1)
    examples, version_2 = squad.read_squad(path)
    assert version_2 and sum(e.is_impossible for e in examples) == 3
    feats = squad.features(tokenizer, examples, seq_len=24, doc_stride=4)
    assert len(feats.example) > len(examples)  # contexts span several windows
    starts = np.full(feats.arrays["input_ids"].shape, -10.0)
    ends = starts.copy()
    for f, e in enumerate(feats.example):
        s, t = feats.arrays["start_positions"][f], feats.arrays["end_positions"][f]
        if s:  # the labelled span decodes to the answer text
            ids = feats.arrays["input_ids"][f, s : t + 1]
            assert tokenizer.decode(ids).strip() == examples[e].answers[0][0]
        starts[f, s], ends[f, t] = 5.0, 5.0
    predictions = squad.postprocess(examples, feats, starts, ends, version_2=True)
    for e in examples:
        assert predictions[e.id] == (e.answers[0][0] if e.answers else "")
    assert squad.score(examples, predictions) == {"exact_match": 100.0, "f1": 100.0}
    # v1.1: never the empty answer; max_answer_length bounds the span
    v1 = squad.postprocess(examples, feats, starts, ends, version_2=False)
    assert all(v1[e.id] for e in examples)


def test_classification_records_labels_and_truncation(base, tmp_path):
    tokenizer = opt_jax.OPTTokenizer.from_pretrained(base)
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"t": "alpha " * 40, "p": "beta", "y": 2}, {"t": "good", "p": "bad " * 3, "y": 10},
    ])  # fmt: skip
    records = classification.read_jsonl(path, "t", "p", "y")
    names = classification.label_names(records)
    assert names == ("2", "10")  # integers sort numerically
    arrays = classification.encode(tokenizer, records, names, seq_len=16)
    assert arrays["labels"].tolist() == [0, 1]
    row = arrays["input_ids"][0].tolist()
    assert arrays["attention_mask"][0].sum() == 16 and row[0] == 2 and 2 in row[1:]
    assert tokenizer.decode(row[row.index(2, 1) + 1 :]).strip() == "beta"  # the short side kept
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    m = classification.metrics(logits, np.array([0, 1, 2, 2]))
    assert m["eval_accuracy"] == 0.75
    # per class F1: 1, 2/3, 2/3 -> macro 7/9
    assert m["eval_f1"] == pytest.approx(7 / 9)


@pytest.mark.parametrize(
    "rows, fields, message",
    [
        ([{"text": "a"}], ("text", "", "label"), r"d.jsonl:1: no field 'label'"),
        ([{"text": "a", "label": 1}, {"text": 3, "label": 0}], ("text", "", "label"),
         r"d.jsonl:2: field 'text' must be a string"),
        ([{"text": "a", "label": 1}, {"text": "b", "label": "x"}], ("text", "", "label"),
         r"labels mix integers and strings"),
        ([{"text": "a", "label": 1.5}], ("text", "", "label"), r"must be an integer or a string"),
    ],
)  # fmt: skip
def test_bad_classification_records_are_named(tmp_path, rows, fields, message):
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        classification.label_names(classification.read_jsonl(path, *fields))


def test_bad_squad_files_are_named(base, tmp_path):
    data = {"data": [{"paragraphs": [{"context": "alpha is red.", "qas": [
        {"id": "q1", "question": "What is alpha?", "answers": [{"text": "red", "answer_start": 2}]}
    ]}]}]}  # fmt: skip
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"question 'q1': answers\[0\] 'red' is not at "
                       r"answer_start 2 of its context \(it occurs at 9\)"):  # fmt: skip
        squad.read_squad(str(path))
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 9
    data["data"][0]["paragraphs"][0]["qas"][0]["question"] = "What is alpha? " * 20
    path.write_text(json.dumps(data))
    examples, _ = squad.read_squad(str(path))
    tokenizer = opt_jax.OPTTokenizer.from_pretrained(base)
    with pytest.raises(ValueError, match=r"question 'q1' takes \d+ tokens, leaving -?\d+ context"):
        squad.features(tokenizer, examples, seq_len=32, doc_stride=8, source=str(path))


def test_builtin_tasks_are_written_offline(tmp_path):
    train, dev = builtin.write_classification(str(tmp_path / "cls"))
    records = classification.read_jsonl(train, "text", "", "label")
    dev_records = classification.read_jsonl(dev, "text", "", "label")
    assert classification.label_names(records) == builtin.PACKAGES
    assert {r.label for r in dev_records} == set(builtin.PACKAGES)
    assert len(records) > 3 * len(dev_records) > 300
    train, dev = builtin.write_squad(str(tmp_path / "qa"))
    (t, t_v2), (d, d_v2) = squad.read_squad(train), squad.read_squad(dev)  # answers checked
    assert t_v2 and d_v2 and len(t) > 3 * len(d) > 300
    assert {e.context for e in t}.isdisjoint({e.context for e in d})
    assert 0 < sum(e.is_impossible for e in d) < len(d) / 2


# -- Training end to end ---------------------------------------------------------------------------
def test_classification_trains_and_exports_to_transformers(base, tmp_path):
    import torch
    import transformers

    from opt_jax.training import train

    train_file, dev_file = _sentiment(tmp_path)
    config = _config("classify", tmp_path, base, num_train_steps=40, eval_every_steps=20,
                     checkpoint_every_steps=20, **{"optim.learning_rate": 3e-3,
                     "optim.warmup_steps": 5, "data.train_file": train_file,
                     "data.eval_file": dev_file})  # fmt: skip
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, workdir)
    evals = _metrics(workdir)
    assert [r["step"] for r in evals] == [20, 40]
    for r in evals:
        assert 0.0 <= r["eval_accuracy"] <= 1.0 and 0.0 <= r["eval_f1"] <= 1.0
    assert evals[-1]["eval_accuracy"] >= 0.9  # "good" / "bad" is learnable in 40 steps
    hf = transformers.OPTForSequenceClassification.from_pretrained(workdir / "export").eval()
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    ours_config, params = opt_jax.load_pretrained(workdir / "export")
    assert ours_config.label_names == ("neg", "pos")
    tokenizer = opt_jax.OPTTokenizer.from_pretrained(workdir / "export")
    ids, mask = tokenizer.encode_batch(["alpha good", "beta red bad movie"], padding_side="right")
    ours = opt_jax.model_for(ours_config).apply({"params": params}, ids, attention_mask=mask)
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    np.testing.assert_allclose(np.asarray(ours.logits), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_qa_trains_writes_predictions_and_exports_to_transformers(base, tmp_path):
    import torch
    import transformers

    from opt_jax.training import train

    # 400 contexts (2400 questions), one window each at 48 tokens: 800 steps of a 2-layer
    # model take ~5 s and learn to point at "<name> is <colour>" (windows are tested above).
    train_file = _squad_file(tmp_path / "train.json", 400, seed=0)
    dev_file = _squad_file(tmp_path / "dev.json", 8, seed=1)
    config = _config("qa", tmp_path, base, num_train_steps=800, eval_every_steps=800,
                     checkpoint_every_steps=800, seq_len=48, **{"data.train_file": train_file,
                     "data.eval_file": dev_file, "data.doc_stride": 16,
                     "optim.learning_rate": 3e-3, "optim.warmup_steps": 5})  # fmt: skip
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, workdir)
    (last,) = _metrics(workdir)
    examples, _ = squad.read_squad(dev_file)
    # Answering "" everywhere scores the unanswerable sixth (EM = F1 = 16.7): the model must
    # beat that, so it answers questions (measured: EM 31, F1 36).
    empty = squad.score(examples, {e.id: "" for e in examples})
    assert empty == pytest.approx({"exact_match": 100 / 6, "f1": 100 / 6})
    assert last["eval_exact_match"] > empty["exact_match"] + 5, last
    assert last["eval_f1"] > empty["f1"] + 10, last
    predictions = json.loads((workdir / "predictions.json").read_text())
    assert set(predictions) == {e.id for e in examples}
    rescored = squad.score(examples, predictions)  # what the official script would print
    assert rescored["f1"] == pytest.approx(last["eval_f1"])
    assert rescored["exact_match"] == pytest.approx(last["eval_exact_match"])
    hf = transformers.OPTForQuestionAnswering.from_pretrained(workdir / "export").eval()
    ours_config, params = opt_jax.load_pretrained(workdir / "export")
    ids, mask = opt_jax.OPTTokenizer.from_pretrained(workdir / "export").encode_batch(
        ["What is alpha? alpha is red.", "beta"], padding_side="right"
    )
    ours = opt_jax.model_for(ours_config).apply({"params": params}, ids, attention_mask=mask)
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    for a, b in ((ours.start_logits, ref.start_logits), (ours.end_logits, ref.end_logits)):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-5, atol=1e-5)


def test_lora_classification_trains_head_and_adapters_for_peft(base, tmp_path, monkeypatch):
    """LoRA on a classification task: the decoder stays frozen, adapters and the score head
    train (every lora_B leaves its zero init, the head its random init, the dev loss falls);
    WORKDIR/adapter loads in peft on transformers and in opt_jax, equal to the merged export."""
    import jax
    import peft
    import torch
    import transformers

    from opt_jax.training import train

    initial = {}
    resolve = train.resolve_model

    def spy(*args, **kwargs):  # the parameters training starts from (a copy: they are donated)
        opt_config, params = resolve(*args, **kwargs)
        initial.update(jax.tree.map(lambda x: np.array(x, copy=True), params))
        return opt_config, params

    monkeypatch.setattr(train, "resolve_model", spy)
    train_file, dev_file = _sentiment(tmp_path, n_train=32, n_dev=16)
    # An eval after every step: step 1's learning rate is 0 (warmup), so its eval_loss is the
    # starting model's.
    config = _config("classify", tmp_path, base, num_train_steps=6, eval_every_steps=1,
                     log_every_steps=1, checkpoint_every_steps=6,
                     **{"lora.rank": 4, "lora.alpha": 8.0,
                     "optim.learning_rate": 1e-2, "data.train_file": train_file,
                     "data.eval_file": dev_file})  # fmt: skip
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, workdir)
    evals = [r["eval_loss"] for r in _metrics(workdir)]
    assert len(evals) == 6 and evals[-1] < evals[0], evals
    spec = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    assert spec["task_type"] == "SEQ_CLS" and spec["modules_to_save"] == ["score"]
    ours_config, params = opt_jax.load_pretrained(base, adapter=workdir / "adapter")
    merged_config, merged = opt_jax.load_pretrained(workdir / "export")
    base_config, base_params = opt_jax.load_pretrained(base)
    from conftest import assert_trees_equal

    assert_trees_equal(merged["model"]["decoder"]["embed_tokens"],
                       base_params["model"]["decoder"]["embed_tokens"])  # fmt: skip
    # Trained: every lora_B (zero at the start) and every leaf of the head moved.
    paths = jax.tree_util.tree_leaves_with_path(params)
    b = {jax.tree_util.keystr(p): x for p, x in paths if p[-1].key == "lora_B"}
    start = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(initial)}
    assert len(b) == 2 * ours_config.num_hidden_layers  # q_proj and v_proj
    assert all(not start[k].any() and np.abs(np.asarray(x)).max() > 0 for k, x in b.items())
    assert set(initial["score"]) == set(params["score"]) and initial["score"]
    for leaf, value in params["score"].items():
        assert np.abs(np.asarray(value) - initial["score"][leaf]).max() > 0, leaf
    ids, mask = opt_jax.OPTTokenizer.from_pretrained(base).encode_batch(
        ["alpha good", "beta red bad movie"], padding_side="right"
    )
    adapted = opt_jax.model_for(ours_config).apply({"params": params}, ids, attention_mask=mask)
    folded = opt_jax.model_for(merged_config).apply({"params": merged}, ids, attention_mask=mask)
    np.testing.assert_allclose(adapted.logits, folded.logits, rtol=1e-5, atol=1e-5)
    hf_base = transformers.OPTForSequenceClassification.from_pretrained(base, num_labels=2)
    hf = peft.PeftModel.from_pretrained(hf_base, workdir / "adapter").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    np.testing.assert_allclose(np.asarray(adapted.logits), ref.logits.numpy(), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_bad_task_data_fails_before_anything_is_written(base, tmp_path):
    from opt_jax.training import train

    train_file, _ = _sentiment(tmp_path)
    dev = _write_jsonl(tmp_path / "dev.jsonl", [{"text": "alpha", "label": "pos"},
                                                 {"text": "beta", "label": "meh"}])  # fmt: skip
    config = _config("classify", tmp_path, base, **{"data.train_file": train_file,
                                                     "data.eval_file": dev})  # fmt: skip
    with pytest.raises(ValueError, match=r"dev.jsonl:2: label 'meh' does not occur in .*train"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "train_config.json").exists()
    config = _config(
        "qa",
        tmp_path,
        base,
        **{"data.train_file": "builtin", "data.eval_file": str(tmp_path / "nope.json")},
    )
    with pytest.raises(ValueError, match="both be 'builtin' or both name files"):
        train.train_and_evaluate(config, tmp_path / "run2")


@pytest.mark.parametrize("head", ["OPTForSequenceClassification", "OPTForQuestionAnswering"])
def test_peft_task_adapter_loads_onto_a_language_model_base(base, tmp_path, head):
    """An adapter PEFT trained with its task head (modules_to_save) on a language model's
    decoder: load_pretrained(base, adapter=...) gives PEFT's logits."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    kwargs = {"num_labels": 3} if head.endswith("Classification") else {}
    hf_base = getattr(transformers, head).from_pretrained(base, **kwargs)
    task_type = "SEQ_CLS" if kwargs else "QUESTION_ANS"
    lora_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], task_type=task_type
    )
    model = peft.get_peft_model(hf_base, lora_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.5)
    model.eval().save_pretrained(tmp_path / "adapter")
    config, params = opt_jax.load_pretrained(base, adapter=tmp_path / "adapter")
    assert config.architecture == head and config.lora_rank == 4
    ids, mask = opt_jax.OPTTokenizer.from_pretrained(base).encode_batch(
        ["alpha good", "beta red bad movie"], padding_side="right"
    )
    ours = opt_jax.model_for(config).apply({"params": params}, ids, attention_mask=mask)
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        )
    names = ("logits",) if kwargs else ("start_logits", "end_logits")
    for name in names:
        np.testing.assert_allclose(np.asarray(getattr(ours, name)), getattr(ref, name).numpy(),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_a_task_on_a_config_without_its_fields_is_named(tmp_path):
    from train_helpers import tiny_train_config

    from opt_jax.training import objectives

    config = tiny_train_config(task="qa")
    with pytest.raises(ValueError, match=r"needs data.train_file, .* start from configs/qa.py"):
        objectives.build(config, str(tmp_path), resuming=False)
    with pytest.raises(ValueError, match=r"config.task 'ner' is not one of"):
        objectives.build(tiny_train_config(task="ner"), str(tmp_path), resuming=False)


def test_classification_resumes_exactly_on_a_two_device_mesh(base, tmp_path):
    """SIGTERM at step 4 then a resume gives the uninterrupted run's parameters bit for bit,
    with the batch (labels included) split over 2 emulated devices."""
    import os
    import subprocess
    import sys

    from conftest import assert_trees_equal

    from opt_jax.checkpoints import orbax_io

    train_file, dev_file = _sentiment(tmp_path, n_train=32, n_dev=8)
    overrides = {"task": "classification", "init_from": base, "data.train_file": train_file,
                 "data.eval_file": dev_file, "data.text_field": "text",
                 "data.text_pair_field": "", "data.label_field": "label",
                 "num_train_steps": 8, "eval_every_steps": 4,
                 "checkpoint_every_steps": 4}  # fmt: skip
    helper = ROOT / "tests" / "train_helpers.py"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(helper.parent))

    def run(workdir, *flags):
        cmd = [sys.executable, str(helper), str(workdir), json.dumps(overrides), "--devices", "2",
               *flags]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def final(workdir):  # the exported parameters (this process has one device)
        return opt_jax.load_pretrained(workdir / "export")[1]

    run(tmp_path / "straight")
    run(tmp_path / "resumed", "--sigterm-at", "4")
    assert orbax_io.TrainCheckpoints(tmp_path / "resumed", keep=2).latest_step() == 4
    run(tmp_path / "resumed")
    assert_trees_equal(final(tmp_path / "resumed"), final(tmp_path / "straight"))
    assert _metrics(tmp_path / "resumed")[-1]["eval_accuracy"] == pytest.approx(
        _metrics(tmp_path / "straight")[-1]["eval_accuracy"]
    )
