"""Training: exact resume after kill -9 and SIGTERM, update skipping, AdamW vs torch, bad input,
and a one-step smoke test of every config file."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
from conftest import assert_trees_equal
from train_helpers import tiny_train_config

import opt_jax
from opt_jax.checkpoints import orbax_io as checkpoint
from opt_jax.planning import roofline
from opt_jax.training import train
from opt_jax.training.metrics import read_metrics
from opt_jax.training.step import decay_mask

ROOT = Path(__file__).resolve().parent.parent
HELPER = Path(__file__).resolve().parent / "train_helpers.py"
TIMING = {"tokens_per_s", "step_time", "tflops_per_device", "sample"}


def _run_trainer(workdir, overrides=None, *flags, expect_kill=False):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(HELPER.parent))
    cmd = [sys.executable, str(HELPER), str(workdir), json.dumps(overrides or {}), *flags]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"trainer timed out; output:\n{e.stdout}\n{e.stderr}")
    if expect_kill:
        assert proc.returncode == -9, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(workdir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(workdir)]


def _final_state(workdir, step=12):
    ckpts = checkpoint.TrainCheckpoints(workdir, keep=2)
    assert ckpts.latest_step() == step
    meta = ckpts.read_meta(step)
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    restored = ckpts.manager.restore(step, args=args)["state"]
    ckpts.close()
    return meta, restored


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run_trainer(workdir)
    return workdir


def _assert_same_run(workdir, reference):
    ours, theirs = _losses(workdir), _losses(reference)
    assert [r["step"] for r in ours] == list(range(1, 13))  # every step logged exactly once
    assert ours == theirs  # losses, grad norms, eval losses: bitwise (JSON round-trips floats)
    (_, a), (_, b) = _final_state(workdir), _final_state(reference)
    assert_trees_equal(a, b)  # params, Adam moments, counters
    _, params_a = checkpoint.load_params(workdir / "export")
    _, params_b = checkpoint.load_params(reference / "export")
    assert_trees_equal(params_a, params_b)


@pytest.mark.slow
@pytest.mark.parametrize("kill_step", [4, 8, 12], ids=["first-save", "mid-run", "deleting-save"])
def test_kill_9_during_save_then_exact_resume(tmp_path, reference_run, kill_step):
    _run_trainer(tmp_path, None, "--kill-after-save", str(kill_step), expect_kill=True)
    committed = checkpoint.TrainCheckpoints(tmp_path, keep=2)
    latest = committed.latest_step()
    committed.close()
    # The interrupted save is never taken for a complete one.
    assert latest in (kill_step - 4 or None, kill_step)
    _run_trainer(tmp_path)
    _assert_same_run(tmp_path, reference_run)


@pytest.mark.slow
def test_sigterm_saves_then_exact_resume(tmp_path, reference_run):
    proc = _run_trainer(tmp_path, None, "--sigterm-at", "6")
    assert "signal 15: saved step 6" in proc.stdout
    ckpts = checkpoint.TrainCheckpoints(tmp_path, keep=2)
    assert ckpts.latest_step() == 6
    ckpts.close()
    assert not (tmp_path / "export").exists()  # a preempted run exports nothing
    _run_trainer(tmp_path)
    _assert_same_run(tmp_path, reference_run)


def test_metrics_and_outputs(reference_run):
    records = read_metrics(reference_run)
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "skipped"):
        assert all(key in r for r in records), key
    # Model TFLOP/s per device = 3 x forward FLOPs per token x tokens/s / devices (one here).
    model_config, _ = checkpoint.load_params(reference_run / "export")
    seq_len = json.loads((reference_run / "train_config.json").read_text())["seq_len"]
    per_token = 3 * roofline.model_flops_per_token(model_config, seq_len)
    for r in records:
        assert r["tflops_per_device"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12)
    assert "mfu" not in records[0]  # only on accelerators whose peak is known
    assert [r["step"] for r in records if "eval_loss" in r] == [6, 12]
    assert records[-1]["loss"] < records[0]["loss"]
    assert (reference_run / "train_config.json").exists()
    assert list((reference_run / "tensorboard").glob("events.out.tfevents.*"))
    config, _ = checkpoint.load_params(reference_run / "export")
    assert opt_jax.OPTTokenizer.from_pretrained(reference_run / "export").vocab_size == 300
    assert config.vocab_size == 304  # the trained tokenizer's 300 ids, rounded up to 8


def _tiny_state(optim, nan=False):
    config = opt_jax.OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=16, dropout=0.0,
    )  # fmt: skip
    model = opt_jax.OPTForCausalLM(config)
    params = opt_jax.init_params(config, 0)
    if nan:
        params["model"]["decoder"]["layers_0"]["fc1"]["bias"] = jnp.full((32,), jnp.nan)
    tx = train.make_optimizer(optim, 100)
    state = train.fresh_state(params, tx)
    batch = {"input_ids": jnp.arange(16).reshape(2, 8) % 50, "attention_mask": jnp.ones((2, 8))}
    step = jax.jit(
        lambda s, b: train.train_step(s, b, jax.random.key(0), model=model, tx=tx, optim=optim)
    )
    return state, batch, step


def test_nonfinite_and_spike_updates_are_skipped():
    optim = tiny_train_config().optim
    optim.spike_factor = 2.0
    optim.spike_warmup_steps = 1
    state, batch, step = _tiny_state(optim, nan=True)
    new, metrics = step(state, batch)
    assert not np.isfinite(metrics["loss"]) and int(new.skipped) == 1 and int(new.step) == 1
    assert_trees_equal(new.params, state.params)
    # A normal step is taken; then a loss far above the running mean is skipped as a spike.
    state, batch, step = _tiny_state(optim)
    state, _ = step(state, batch)
    assert int(state.skipped) == 0 and float(state.loss_avg) > 0
    spiking = state.replace(loss_avg=state.loss_avg * 0.1)
    new, _ = step(spiking, batch)
    assert int(new.skipped) == 1
    assert_trees_equal(new.params, spiking.params)


def test_adamw_step_matches_torch():
    optim = tiny_train_config().optim
    optim.schedule, optim.warmup_steps, optim.grad_clip = "constant", 0, 0.0
    rng = np.random.RandomState(0)
    params = {
        "kernel": rng.randn(4, 3).astype(np.float32), "bias": rng.randn(3).astype(np.float32)
    }  # fmt: skip
    grads = [
        {k: rng.randn(*v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)
    ]
    tx = train.make_optimizer(optim, 10)
    ours, opt_state = jax.tree.map(jnp.asarray, params), None
    opt_state = tx.init(ours)
    w, b = (torch.tensor(params[k], requires_grad=True) for k in ("kernel", "bias"))
    torch_opt = torch.optim.AdamW(
        [{"params": [w], "weight_decay": optim.weight_decay}, {"params": [b], "weight_decay": 0.0}],
        lr=optim.learning_rate, betas=(optim.b1, optim.b2), eps=optim.eps,
    )  # fmt: skip
    for g in grads:
        updates, opt_state = tx.update(jax.tree.map(jnp.asarray, g), opt_state, ours)
        ours = optax.apply_updates(ours, updates)
        w.grad, b.grad = torch.tensor(g["kernel"]), torch.tensor(g["bias"])
        torch_opt.step()
    np.testing.assert_allclose(ours["kernel"], w.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours["bias"], b.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_bad_training_inputs(tmp_path):
    with pytest.raises(ValueError, match="matches no file"):
        train.train_and_evaluate(
            tiny_train_config(**{"data.source": str(tmp_path / "*.txt")}), tmp_path / "a"
        )
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(ValueError, match="yields no text"):
        train.train_and_evaluate(
            tiny_train_config(**{"data.source": str(tmp_path / "*.txt")}), tmp_path / "b"
        )
    with pytest.raises(
        ValueError, match="seq_len 128 exceeds the model's max_position_embeddings 64"
    ):
        train.train_and_evaluate(tiny_train_config(seq_len=128), tmp_path / "c")
    assert not (tmp_path / "c" / "data").exists()  # refused before any tokenizing
    with pytest.raises(
        ValueError, match="batch_size 3 is not divisible by the 2 data-parallel devices"
    ):
        train.check_config(tiny_train_config(batch_size=3), 2, str(tmp_path), None)
    with pytest.raises(ValueError, match="not divisible by optim.grad_accum_steps 3"):
        train.train_and_evaluate(tiny_train_config(**{"optim.grad_accum_steps": 3}), tmp_path / "d")


def test_init_from_and_workdir_mismatches(tmp_path):
    config = opt_jax.OPTConfig(vocab_size=304, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                               num_attention_heads=2, max_position_embeddings=64)  # fmt: skip
    opt_jax.save_pretrained(tmp_path / "hf", config, opt_jax.init_params(config, 0))
    # Fine-tuning uses the checkpoint's own tokenizer; a checkpoint without one is refused.
    with pytest.raises(ValueError, match="has no tokenizer: .*--config.data.tokenizer"):
        train.train_and_evaluate(tiny_train_config(init_from=str(tmp_path / "hf")), tmp_path / "w0")
    assert not (tmp_path / "w0" / "data").exists()
    opt_jax.train_tokenizer(["def f(x):\n    return x\n" * 50], 300).save(tmp_path / "hf")
    with pytest.raises(
        ValueError, match=r"does not match the model config: .*hidden_size: 32 vs 16"
    ):
        train.train_and_evaluate(tiny_train_config(init_from=str(tmp_path / "hf")), tmp_path / "w1")
    with pytest.raises(ValueError, match="is not a directory"):
        train.train_and_evaluate(
            tiny_train_config(init_from=str(tmp_path / "nope")), tmp_path / "w2"
        )
    # A workdir holding a checkpoint of another model is refused, not silently reshaped.
    train.train_and_evaluate(tiny_train_config(num_train_steps=1), tmp_path / "w3")
    wider = tiny_train_config(num_train_steps=2, **{"model.ffn_dim": 48})
    with pytest.raises(
        ValueError, match=r"holds a checkpoint of a different model: ffn_dim: 48 vs 64"
    ):
        train.train_and_evaluate(wider, tmp_path / "w3")


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_only_on_matrices_and_embeddings(scan):
    """Biases (q/k/v's are [heads, head_dim]) and LayerNorms are never decayed, scanned or not."""
    config = opt_jax.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                               num_attention_heads=2, scan_layers=scan)  # fmt: skip
    params = opt_jax.abstract_params(config)
    mask = decay_mask(params)
    for path, decayed in jax.tree_util.tree_leaves_with_path(mask):
        leaf = path[-1].key
        assert decayed == (leaf in ("kernel", "embedding")), jax.tree_util.keystr(path)
    assert sum(jax.tree.leaves(mask)) == 2 + 6 * (1 if scan else 2)  # 2 embeddings, 6 kernels


def test_spike_detection_without_warmup_accepts_the_first_step():
    optim = tiny_train_config().optim
    optim.spike_factor, optim.spike_warmup_steps = 3.0, 0
    state, batch, step = _tiny_state(optim)
    state, _ = step(state, batch)
    state, _ = step(state, batch)
    assert int(state.skipped) == 0 and float(state.loss_avg) > 0


def test_skipped_steps_do_not_advance_the_schedule_and_the_log_says_so(tmp_path):
    """After two accepted steps every update spikes (factor 1e-6): the optimiser's count stays
    at 2, and the logged learning rate is the one the last applied update used."""
    config = tiny_train_config(
        num_train_steps=4, eval_every_steps=0, checkpoint_every_steps=4,
        **{"optim.spike_factor": 1e-6, "optim.spike_warmup_steps": 2, "optim.warmup_steps": 3},
    )  # fmt: skip
    train.train_and_evaluate(config, tmp_path)
    records = read_metrics(tmp_path)
    assert [r["skipped"] for r in records] == [0, 0, 1, 2]
    schedule = train.make_schedule(config.optim, config.num_train_steps)
    want = [schedule(0), schedule(1), schedule(1), schedule(1)]
    assert [r["learning_rate"] for r in records] == pytest.approx([float(x) for x in want])
    _, state = _final_state(tmp_path, step=4)
    counts = [int(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) == 0]
    assert counts and all(c == 2 for c in counts)


def test_grad_accumulation_matches_one_big_batch():
    optim = tiny_train_config().optim
    state, batch, step = _tiny_state(optim)
    one, m1 = step(state, batch)
    optim.grad_accum_steps = 2
    state2, _, step2 = _tiny_state(optim)
    two, m2 = step2(state2, batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    assert_trees_equal(one.params, two.params, rtol=1e-5, atol=1e-6)


def _config_module(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Every config file; opt.py in a pre-LN size and in opt-350m's post-LN + project_in/out shape.
CONFIG_RUNS = [
    (p, None)
    for p in sorted((ROOT / "configs").glob("*.py"))
    if p.stem not in ("opt", "classify", "qa")  # the task configs: tests/test_tasks.py
]
CONFIG_RUNS += [(ROOT / "configs" / "opt.py", "125m"), (ROOT / "configs" / "opt.py", "350m")]


@pytest.mark.parametrize(
    "path, arg", CONFIG_RUNS, ids=[p.stem + (f":{a}" if a else "") for p, a in CONFIG_RUNS]
)
def test_every_config_file_runs_one_step_shrunk(tmp_path, path, arg):
    module = _config_module(path)
    config = module.get_config(arg) if arg else module.get_config()
    assert f"scripts/train.py --config configs/{path.name}" in module.__doc__
    small = tiny_train_config()
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "ffn_dim",
        "num_attention_heads",
        "max_position_embeddings",
    ):
        config.model[key] = small.model[key]
    if config.model.preset == "350m":
        config.model.word_embed_proj_dim = 16  # keep the project_in/out path
    elif config.model.preset:
        config.model.word_embed_proj_dim = 32
    config.model.vocab_size = None
    for key in ("batch_size", "seq_len", "eval_batches", "log_every_steps", "keep_checkpoints"):
        config[key] = small[key]
    config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 1, 1, 1
    config.data.update(max_files=40, eval_fraction=0.25, vocab_size=300)
    if path.stem == "finetune":
        base = opt_jax.OPTConfig(vocab_size=304, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                 num_attention_heads=2, max_position_embeddings=64)  # fmt: skip
        opt_jax.save_pretrained(tmp_path / "base", base, opt_jax.init_params(base, 0))
        opt_jax.train_tokenizer(["def f(x):\n    return x\n"] * 50, 300).save(tmp_path / "base")
        config.init_from = config.data.tokenizer = str(tmp_path / "base")
        for key in small.model:
            if key not in (
                "preset",
                "dropout",
                "dtype",
                "param_dtype",
                "attention_dropout",
                "layerdrop",
            ):
                config.model[key] = None
    last = train.train_and_evaluate(config, tmp_path / "run")
    assert np.isfinite(last["loss"]) and np.isfinite(last["eval_loss"])


def test_opt_config_carries_table_1():
    module = _config_module(ROOT / "configs" / "opt.py")
    for size, (lr, batch_size) in module.TABLE_1.items():
        c = module.get_config(size)
        assert c.model.preset == size and c.optim.learning_rate == lr and c.seq_len == 2048
        assert c.batch_size == batch_size and c.batch_size * c.seq_len in (
            2**19,
            2**20,
            2**21,
            2**22,
        )
        assert abs(c.num_train_steps * batch_size * 2048 - 300e9) < batch_size * 2048
        assert c.optim.b2 == 0.95 and c.optim.weight_decay == 0.1 and c.optim.grad_clip == 1.0
    assert module.get_config("175b").optim.warmup_steps == 2000
    assert module.get_config("125m").optim.warmup_steps == 715  # 375M tokens / 2^19 per step
    with pytest.raises(ValueError, match="configs/opt.py:SIZE takes one of 125m"):
        module.get_config("7b")


def test_every_config_field_can_be_overridden_from_the_command_line(monkeypatch):
    """ml_collections refuses to override a field whose default is None; every field of the
    base config is typed, so each one takes a command-line override."""
    from absl import flags
    from ml_collections import config_flags

    samples = {int: "7", float: "0.5", bool: "False", str: "relu"}
    path = ROOT / "configs" / "tiny.py"
    base = _config_module(path).get_config()
    leaves = {}

    def walk(node, prefix):
        for key in node.keys():
            field = node.get_ref(key) if hasattr(node, "get_ref") else None
            value = node[key]
            if hasattr(value, "keys"):
                walk(value, prefix + key + ".")
            elif field is not None and field.get_type() in samples:
                leaves[prefix + key] = field.get_type()

    walk(base, "")
    assert {"model.do_layer_norm_before", "model.hidden_size", "optim.b2", "seed"} <= set(leaves)
    for name, kind in leaves.items():
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True)
        argv = ["train.py", f"--config={path}", f"--config.{name}={samples[kind]}"]
        monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
        values(argv)
        got = values.config
        for part in name.split("."):
            got = got[part]
        assert got == kind(samples[kind]) if kind is not bool else got is False, name


def test_train_cli_locks_config(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", "configs/tiny.py",
         "--workdir", str(tmp_path), "--config.optim.learning_rat=0.1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # A typo of a field: the closest name is suggested, then every field is listed.
    assert (
        "error: --config.optim.learning_rat: optim has no field 'learning_rat' "
        "(did you mean learning_rate?); its fields: " in proc.stderr
    ), proc.stderr
    assert "warmup_steps" in proc.stderr.split("its fields: ")[1]
    assert not (tmp_path / "checkpoints").exists()


def test_plot_metrics_writes_png(reference_run, tmp_path):
    out = tmp_path / "curves.png"
    subprocess.run(
        [sys.executable, "scripts/plot_metrics.py", "--workdir", str(reference_run),
         "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_bf16_compute_keeps_float32_master_weights():
    optim = tiny_train_config().optim
    optim.warmup_steps = 0  # the first warmup step has learning rate 0
    config = opt_jax.OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=16, dropout=0.0, dtype="bfloat16",
    )  # fmt: skip
    model = opt_jax.OPTForCausalLM(config)
    tx = train.make_optimizer(optim, 100)
    state = train.fresh_state(opt_jax.init_params(config, 0), tx)
    batch = {"input_ids": jnp.arange(16).reshape(2, 8) % 50, "attention_mask": jnp.ones((2, 8))}
    new, metrics = train.train_step(
        state, batch, jax.random.key(0), model=model, tx=tx, optim=optim
    )
    assert np.isfinite(metrics["loss"]) and int(new.skipped) == 0
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
    assert any(
        (a != b).any()
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True)
    )


@pytest.mark.parametrize("accum", [1, 2])
def test_the_train_state_keeps_its_types_with_bfloat16_parameters(accum):
    """Pure bfloat16 parameters: a step returns a state of exactly the input's types (else the
    second step recompiles and a restore casts the Adam moments)."""
    optim = tiny_train_config().optim
    optim.grad_accum_steps = accum
    config = opt_jax.OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=16, dtype="bfloat16", param_dtype="bfloat16",
    )  # fmt: skip
    model = opt_jax.OPTForCausalLM(config)
    tx = train.make_optimizer(optim, 100)
    state = train.fresh_state(opt_jax.init_params(config, 0), tx)
    batch = {"input_ids": jnp.arange(16).reshape(2, 8) % 50, "attention_mask": jnp.ones((2, 8))}
    step = jax.jit(lambda s: train.train_step(s, batch, jax.random.key(0), model=model, tx=tx,
                                              optim=optim)[0])  # fmt: skip
    before = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    after = jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(step, state))
    assert after == before
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}


def test_scan_and_remat_training_resumes_exactly(tmp_path):
    """With scan_layers and remat, resuming from a mid-run checkpoint repeats the uninterrupted
    run bit for bit (losses, parameters, optimiser state)."""
    overrides = {"model.scan_layers": True, "model.remat_policy": "save_dots", "num_train_steps": 4,
                 "checkpoint_every_steps": 2, "eval_every_steps": 4}  # fmt: skip
    whole = tmp_path / "whole"
    last = train.train_and_evaluate(tiny_train_config(**overrides), whole)
    assert last["step"] == 4 and np.isfinite(last["eval_loss"])
    # The same run, interrupted after its step-2 checkpoint: drop what came after it.
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    shutil.rmtree(resumed / "export")
    train.train_and_evaluate(tiny_train_config(**overrides), resumed)
    assert _losses(resumed) == _losses(whole)
    (_, a), (_, b) = _final_state(resumed, step=4), _final_state(whole, step=4)
    assert_trees_equal(a, b)


def test_train_config_json_records_the_run_and_survives_failed_or_changed_resumes(tmp_path):
    # A run refused by its checks writes no record.
    with pytest.raises(ValueError, match="seq_len 128 exceeds"):
        train.train_and_evaluate(tiny_train_config(seq_len=128), tmp_path / "bad")
    assert not (tmp_path / "bad" / "train_config.json").exists()
    first = tiny_train_config(num_train_steps=2, checkpoint_every_steps=2, eval_every_steps=2)
    train.train_and_evaluate(first, tmp_path / "run")
    record = (tmp_path / "run" / "train_config.json").read_text()
    assert json.loads(record)["num_train_steps"] == 2
    # A failed resume (a different architecture) leaves it alone ...
    with pytest.raises(ValueError, match="holds a checkpoint of a different model"):
        train.train_and_evaluate(
            tiny_train_config(num_train_steps=4, **{"model.ffn_dim": 48}), tmp_path / "run"
        )
    assert (tmp_path / "run" / "train_config.json").read_text() == record
    # ... and a changed one is recorded beside it.
    longer = tiny_train_config(num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=2)
    train.train_and_evaluate(longer, tmp_path / "run")
    assert (tmp_path / "run" / "train_config.json").read_text() == record
    changed = json.loads((tmp_path / "run" / "train_config.step_2.json").read_text())
    assert changed["num_train_steps"] == 4
