"""The command-line entry points run as users run them (in a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import opt_jax
from opt_jax.checkpoints import orbax_io as checkpoint
from opt_jax.planning import roofline

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, cwd=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_random_checkpoint_runs(tmp_path):
    out = _run("scripts/random_checkpoint.py", "--out", str(tmp_path / "demo"))
    assert "reloaded" in out and "bit for bit" in out
    config, _ = opt_jax.load_pretrained(tmp_path / "demo")
    assert config.num_hidden_layers == 4
    tok = opt_jax.OPTTokenizer.from_pretrained(tmp_path / "demo")
    assert tok.vocab_size == 4096


def test_convert_hf_to_orbax_and_back(hf_dir, tmp_path):
    _, directory = hf_dir("post_ln_project")
    _run("scripts/convert.py", "--to", "orbax", "--src", directory, "--dst", str(tmp_path / "ckpt"))
    config, params = checkpoint.load_params(tmp_path / "ckpt")
    assert config.word_embed_proj_dim == 8
    _run(
        "scripts/convert.py",
        "--to",
        "hf",
        "--src",
        str(tmp_path / "ckpt"),
        "--dst",
        str(tmp_path / "hf"),
    )
    original = load_file(os.path.join(directory, "model.safetensors"))
    back = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(original) == set(back)
    for key in original:
        np.testing.assert_array_equal(original[key], back[key])


def test_orbax_checkpoint_of_another_model_is_rejected(hf_dir, tmp_path):
    _, directory = hf_dir("pre_ln")
    config, params = opt_jax.load_pretrained(directory)
    checkpoint.save_params(tmp_path / "ckpt", config, params)
    with pytest.raises(FileExistsError):
        checkpoint.save_params(tmp_path / "ckpt", config, params)
    bigger = config.replace(ffn_dim=40)
    bigger.save_hf(tmp_path / "ckpt")  # a config.json that no longer matches the params
    with pytest.raises(
        ValueError,
        match=r"\['layers_0'\]\['fc1'\]\['kernel'\]: stored \(16, 37\), config expects \(16, 40\)",
    ):
        checkpoint.load_params(tmp_path / "ckpt")


def test_generate_cli_streams_from_hf_and_orbax(tmp_path):
    _run("scripts/random_checkpoint.py", "--out", str(tmp_path / "demo"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\nimport os\n")
    out = _run(
        "scripts/generate.py", "--model", str(tmp_path / "demo"), "--prompt", "class A:",
        "--prompt_file", str(prompts), "--max_new_tokens", "6", "--do_sample",
    )  # fmt: skip
    assert out.startswith("class A:") and "def f(x):" in out and "import os" in out
    _run(
        "scripts/convert.py",
        "--to",
        "orbax",
        "--src",
        str(tmp_path / "demo"),
        "--dst",
        str(tmp_path / "ck"),
    )
    # convert.py copied the tokenizer, so the checkpoint alone is enough.
    assert (tmp_path / "ck" / "tokenizer.json").is_file()
    proc_out = _run(
        "scripts/generate.py", "--model", str(tmp_path / "ck"),
        "--prompt", "class A:", "--max_new_tokens", "6", "--num_beams", "2",
    )  # fmt: skip
    assert proc_out.startswith("class A:")
    proc_out = _run(
        "scripts/generate.py", "--model", str(tmp_path / "ck"), "--tokenizer",
        str(tmp_path / "demo"), "--prompt", "class A:", "--max_new_tokens", "6",
    )  # fmt: skip
    assert proc_out.startswith("class A:")
    # Speculative decoding (the contract), the model drafting for itself: same text.
    spec_out = _run(
        "scripts/generate.py", "--model", str(tmp_path / "ck"), "--tokenizer",
        str(tmp_path / "demo"), "--prompt", "class A:", "--max_new_tokens", "6",
        "--assistant", str(tmp_path / "demo"), "--num_assistant_tokens", "3",
    )  # fmt: skip
    assert spec_out == proc_out


def test_profile_ops_names_the_training_steps_operations():
    """The per-operation profile of a (tiny) training step: matmul rows traced back to the
    model code, forward and backward, and no leftover HLO dumps."""
    import glob
    import tempfile

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "opt_jax_hlo_*")))
    out = _run("scripts/profile_ops.py", "--smoke", "--workload", "train", "--top", "200")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")][2:]
    assert rows and all(float(r[0].strip("| ")) >= 0 for r in rows)
    sources = {r[5].strip(" |") for r in rows}
    assert any(s.endswith("fc1/dot_general") and not s.startswith("backward") for s in sources)
    assert any(s.startswith("backward") and s.endswith("fc1/dot_general") for s in sources)
    assert "CPU: " in out and "wall " in out
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "opt_jax_hlo_*"))) == before


def test_benchmark_smoke(tmp_path):
    """The benchmark never rots: its tiny mode runs both peers and writes JSON + markdown."""
    import json

    out = tmp_path / "bench"
    _run("scripts/benchmark.py", "--smoke", "--scale", "--compare", "hf", "--quantize", "llm_int8",
         "--out", str(out))  # fmt: skip
    report = json.loads((tmp_path / "bench.json").read_text())
    results, limits = report["results"], report["meta"]["limits"]
    assert [r["workload"] for r in results][:4] == [
        "decode batch 1", "decode batch 8", "prefill 1 x 32", "train step 2 x 16"
    ]  # fmt: skip
    # Rates are timings; what is reported from them is their formulas' values. The smoke
    # shape: prompt 8 + 8 new tokens (bytes per step at context 12), prefill 32, train 2 x 16.
    config = opt_jax.OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                               num_attention_heads=4, max_position_embeddings=128)  # fmt: skip
    for r in results[:4]:
        assert r["ratio"] == pytest.approx(
            r["opt_jax"]["tokens_per_s"] / r["hf"]["tokens_per_s"], rel=1e-12
        )
    for r, batch in zip(results[:2], (1, 8), strict=True):
        bound = batch * limits["bandwidth"] / roofline.decode_bytes_per_step(config, batch, 12, 4)
        assert r["bandwidth_utilisation"] == pytest.approx(
            r["opt_jax"]["tokens_per_s"] / bound, rel=1e-12
        )
    for r, context, factor in ((results[2], 32, 1), (results[3], 16, 3)):
        flops = factor * roofline.model_flops_per_token(config, context)
        assert r["mfu"] == pytest.approx(
            flops * r["opt_jax"]["tokens_per_s"] / limits["flops"], rel=1e-12
        )
    table = (tmp_path / "bench.md").read_text()
    assert "| decode batch 1 |" in table and "| compile train_step, scan |" in table
    load = next(r for r in results if r["workload"].startswith("load HF checkpoint"))
    assert load["peak_growth_mb"] > 0  # a memory measurement (host RSS), not a timing
    assert load["ratio"] == pytest.approx(load["peak_growth_mb"] / load["checkpoint_mb"])
    quantized = [r for r in results if r["workload"].endswith("llm_int8 weights")]
    assert len(quantized) == 1  # smoke: batch 1 only
    assert quantized[0]["vs_float32"] == pytest.approx(
        quantized[0]["tokens_per_s"] / quantized[0]["float32_tokens_per_s"], rel=1e-12
    )
    assert "| decode batch 1, llm_int8 weights |" in table
