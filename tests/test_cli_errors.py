"""The command-line scripts report bad input as one clear line (no traceback), before any slow
work, and the library raises named errors for the same mistakes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import opt_jax
from opt_jax.checkpoints import orbax_io as checkpoint
from opt_jax.parallel import distributed
from opt_jax.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"] * 20


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    return proc.returncode, proc.stdout, proc.stderr


def _fails(*args, match: str) -> tuple[str, str]:
    """Runs a script that must fail with a clean `error: ...` matching `match`."""
    rc, out, err = _run(*args)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err, err
    assert err.startswith("error: "), err
    assert re.search(match, err), err
    return out, err


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random HF directory with a tokenizer and 64 positions."""
    directory = tmp_path_factory.mktemp("tiny") / "hf"
    tokenizer = opt_jax.train_tokenizer(TEXTS, vocab_size=300)
    config = opt_jax.OPTConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    # Seed 1 generates byte tokens that decode to U+FFFD, so re-encoding the text miscounts.
    opt_jax.save_pretrained(directory, config, opt_jax.init_params(config, 1))
    tokenizer.save(directory)
    return str(directory)


# -- distributed --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "given, missing",
    [
        (dict(num_processes=2, process_id=1), "--coordinator_address"),
        (dict(coordinator_address="localhost:1234"), "--num_processes, --process_id"),
        (dict(coordinator_address="localhost:1234", num_processes=2), "--process_id"),
    ],
)
def test_partial_multi_process_arguments_are_an_error(given, missing):
    with pytest.raises(ValueError, match=f"go together: .* but not {missing}$"):
        distributed.initialize(**given)


def test_multi_process_argument_values_are_checked():
    with pytest.raises(ValueError, match=r"--process_id must be in \[0, 2\)"):
        distributed.initialize("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="--num_processes must be >= 1"):
        distributed.initialize("localhost:1234", 0, 0)


def test_no_multi_process_arguments_is_single_process(monkeypatch):
    for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False


def test_scripts_report_partial_multi_process_flags(tiny_hf, tmp_path):
    _fails(
        "scripts/generate.py", "--model", tiny_hf, "--prompt", "hi", "--max_new_tokens", "2",
        "--num_processes=2", "--process_id=1",
        match="go together: got --num_processes, --process_id but not --coordinator_address",
    )  # fmt: skip
    # train.py (absl's usage error: help text, then the message, no traceback).
    rc, _, err = _run(
        "scripts/train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
        "--coordinator_address=localhost:1234",
    )  # fmt: skip
    assert rc != 0 and "Traceback" not in err, err
    assert "but not --num_processes, --process_id" in err, err
    assert not (tmp_path / "w").exists()


# -- generate.py -------------------------------------------------------------------------------
def test_generate_checks_every_prompt_before_generating(tiny_hf, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\n" + "x " * 100 + "\nimport os\n")
    out, err = _fails(
        "scripts/generate.py", "--model", tiny_hf, "--prompt_file", str(prompts),
        "--max_new_tokens", "4",
        match=r"^error: prompt 2: \d+ tokens \+ --max_new_tokens 4 = \d+ exceeds the model's 64 "
        "positions",
    )  # fmt: skip
    assert out == ""  # nothing generated, no prompt echoed
    assert "prompt 1" not in err and "prompt 3" not in err


def test_generate_echoes_no_prompt_when_an_option_is_bad(tiny_hf):
    out, _ = _fails(
        "scripts/generate.py", "--model", tiny_hf, "--prompt", "def f(x):", "--top_p", "1.5",
        "--max_new_tokens", "4",
        match="top_p must be in",
    )  # fmt: skip
    assert out == ""


@pytest.mark.parametrize(
    "args, match",
    [
        (["--prompt_file", "/nonexistent/prompts.txt"], "--prompt_file .* does not exist"),
        (
            ["--prompt", "hi", "--max_new_tokens", "0"],
            "--max_new_tokens must be a positive integer, got 0",
        ),
        (["--prompt", "hi", "--stop="], "--stop must be a non-empty string"),
        (["--prompt", "hi", "--num_beams", "2", "--output_logprobs"], "--output_logprobs=True"),
        ([], "give --prompt and/or --prompt_file"),
    ],
)
def test_generate_flag_errors_are_one_line(tiny_hf, args, match):
    _, err = _fails("scripts/generate.py", "--model", tiny_hf, *args, match=match)
    assert err.count("\n") == 1, err


def test_generate_missing_model_and_tokenizer(tiny_hf, tmp_path):
    _fails(
        "scripts/generate.py", "--model", str(tmp_path / "nope"), "--prompt", "hi",
        match="--model .*nope is not a directory",
    )  # fmt: skip
    config, params = opt_jax.load_pretrained(tiny_hf)
    checkpoint.save_params(tmp_path / "ck", config, params)  # no tokenizer files
    _fails(
        "scripts/generate.py", "--model", str(tmp_path / "ck"), "--prompt", "hi",
        match="no tokenizer in .*; pass --tokenizer",
    )  # fmt: skip


def test_generate_beam_search_counts_generated_tokens(tiny_hf):
    rc, out, err = _run(
        "scripts/generate.py", "--model", tiny_hf, "--prompt", "def f(x):", "--num_beams", "2",
        "--max_new_tokens", "7",
    )  # fmt: skip
    assert rc == 0, err
    config, params = opt_jax.load_pretrained(tiny_hf)
    tok = opt_jax.OPTTokenizer.from_pretrained(tiny_hf)
    ids, mask = tok.encode_batch(["def f(x):"])
    sequences = opt_jax.generate(
        opt_jax.OPTForCausalLM(config), params, ids, mask, max_new_tokens=7, num_beams=2,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        vocab_limit=tok.vocab_size,
    ).sequences  # fmt: skip
    new = [int(t) for t in sequences[0, ids.shape[1] :]]
    expected = len([t for t in new if t not in (tok.eos_token_id, tok.pad_token_id)])
    assert len(tok.encode(tok.decode(new), add_prefix=False)) != expected  # the old count
    assert f"[generate] {expected} tokens in" in err, err
    assert out == "def f(x):" + tok.decode(new) + "\n\n"


# -- convert.py --------------------------------------------------------------------------------
def test_convert_checks_destination_before_loading(tiny_hf, tmp_path):
    (tmp_path / "ck" / "params").mkdir(parents=True)
    out, _ = _fails(
        "scripts/convert.py", "--to", "orbax", "--src", tiny_hf, "--dst", str(tmp_path / "ck"),
        match="already holds an orbax checkpoint",
    )  # fmt: skip
    assert "parameters" not in out  # the source was not loaded
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    _fails(
        "scripts/convert.py", "--to", "hf", "--src", str(tmp_path / "ck"), "--dst",
        str(tmp_path / "hf"), match="already holds a checkpoint",
    )  # fmt: skip


def test_convert_suggests_the_other_direction(tiny_hf, tmp_path):
    _fails(
        "scripts/convert.py", "--to", "hf", "--src", tiny_hf, "--dst", str(tmp_path / "out"),
        match="did you mean --to orbax",
    )  # fmt: skip
    _fails(
        "scripts/convert.py", "--to", "orbax", "--src", str(tmp_path / "nope"), "--dst",
        str(tmp_path / "out"), match="--src .*nope is not a directory",
    )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_convert_to_orbax_copies_the_tokenizer(tiny_hf, tmp_path):
    rc, out, err = _run(
        "scripts/convert.py", "--to", "orbax", "--src", tiny_hf, "--dst", str(tmp_path / "ck")
    )
    assert rc == 0, out + err
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "ck" / name).read_bytes() == (Path(tiny_hf) / name).read_bytes()
    tok = opt_jax.OPTTokenizer.from_pretrained(tmp_path / "ck")
    assert tok.encode("def f(x):") == opt_jax.OPTTokenizer.from_pretrained(tiny_hf).encode(
        "def f(x):"
    )


# -- plan_memory.py ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, match",
    [
        (["--mesh", "1,64"], r"--mesh expects three positive sizes data,fsdp,tensor .* '1,64'"),
        (["--mesh", "1,x,1"], "--mesh expects three positive sizes data,fsdp,tensor"),
        (["--mesh", "1,0,1"], "--mesh expects three positive sizes data,fsdp,tensor"),
        (["--grad_accum", "0"], "--grad_accum must be >= 1, got 0"),
        (["--batch", "8", "--grad_accum", "3"], "--grad_accum 3 does not divide"),
        (
            ["--preset", "125m", "--seq_len", "4096"],
            "--seq_len 4096 exceeds the 125m model's max_position_embeddings 2048",
        ),
        (["--search", "--compile", "1"], "--compile needs --topology"),
        (["--search", "--chips", "0"], "--chips must be >= 1, got 0"),
        (
            ["--search", "--topology", "v5e:4x4", "--chips", "8"],
            r"--chips 8 disagrees with --topology v5e:4x4 \(16\)",
        ),
        (["--search", "--topology", "v6e:2x2"], "--topology v6e:2x2: no HBM size known for v6e"),
        (["--search", "--topology", "v5e"], "unknown TPU topology 'v5e'"),
    ],
)
def test_plan_memory_input_errors(args, match):
    _fails("scripts/plan_memory.py", *args, match=match)


# -- metrics -----------------------------------------------------------------------------------
def test_missing_metrics_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "metrics.jsonl"))):
        read_metrics(str(tmp_path))
    _fails(
        "scripts/plot_metrics.py", "--workdir", str(tmp_path),
        match=re.escape(f"no metrics at {tmp_path / 'metrics.jsonl'}"),
    )  # fmt: skip


# -- serve.py ----------------------------------------------------------------------------------
def test_serve_reports_a_bad_model_or_length(tiny_hf, tmp_path):
    _fails("scripts/serve.py", "--model", str(tmp_path / "nope"), match="no OPT config.json")
    _fails("scripts/serve.py", "--model", tiny_hf, "--max_length", "0",
           match="max_length")  # fmt: skip


# -- compress -----------------------------------------------------------------------------------
def test_compress_writes_a_model_every_script_loads(tiny_hf, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text("".join(TEXTS))
    out = tmp_path / "gptq"
    rc, stdout, err = _run(
        "scripts/compress.py", "--model", tiny_hf, "--method", "gptq", "--bits", "3",
        "--group_size", "16", "--calibration", str(text), "--nsamples", "6", "--seq_len", "32",
        "--eval", str(text), "--out", str(out), "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    assert rc == 0, err
    result = json.loads(stdout.splitlines()[-1])
    assert result["calibration"] == [6, 32] and len(result["layer_seconds"]) == 2
    assert result["config"]["quantization"] == "gptq" and result["config"]["quant_bits"] == 3
    assert 1 < result["float_perplexity"] < 1000 and 1 < result["perplexity"] < 1000
    assert json.loads((tmp_path / "r.json").read_text())["perplexity"] == result["perplexity"]
    config, params = opt_jax.load_pretrained(out)
    assert (config.quantization, config.quant_bits, config.quant_group_size) == ("gptq", 3, 16)
    tokenizer = opt_jax.OPTTokenizer.from_pretrained(out)  # copied beside the weights
    (text_out,) = opt_jax.generate_text(
        opt_jax.OPTForCausalLM(config), params, tokenizer, ["def f"], max_new_tokens=4
    )
    assert isinstance(text_out, str)
    # The output directory is never overwritten, and that is checked before loading anything.
    _fails("scripts/compress.py", "--model", "/nonexistent", "--method", "rtn", "--out",
           str(out), match=f"--out {out} exists and is not empty")  # fmt: skip


@pytest.mark.parametrize(
    "args, match",
    [
        (["--method", "gptq"], "--method gptq needs --calibration"),
        (["--method", "gptq", "--calibration", "CAL", "--seq_len", "64"],
         r"holds \d+ tokens, fewer than one sequence of 64"),
        (["--method", "gptq", "--calibration", "CAL", "--bits", "9", "--seq_len", "8"],
         r"bits must be an integer in \[2, 8\], got 9"),
    ],
)  # fmt: skip
def test_compress_input_errors(tiny_hf, tmp_path, args, match):
    short = tmp_path / "short.txt"
    short.write_text(TEXTS[0])
    args = [str(short) if a == "CAL" else a for a in args]
    _fails("scripts/compress.py", "--model", tiny_hf, "--out", str(tmp_path / "o"), *args,
           match=match)  # fmt: skip
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()


# -- prepare_data -------------------------------------------------------------------------------
def test_prepare_data_reports_bad_sources_in_one_line(tiny_hf, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "alpha"}\n')
    _fails("scripts/prepare_data.py", "--source", str(tmp_path / "*.txt"), "--tokenizer",
           tiny_hf, "--out", str(tmp_path / "s"),
           match=r"source pattern '.*\*\.txt' matches no file")  # fmt: skip
    _fails("scripts/prepare_data.py", "--source", str(tmp_path / "a.jsonl"), "--tokenizer",
           tiny_hf, "--out", str(tmp_path / "s"),
           match=r"a\.jsonl:1 has no field 'text' \(--jsonl_field\)")  # fmt: skip
    assert not (tmp_path / "s" / "manifest.json").exists()
