"""Bounds the benchmark and the training loop measure against, and the benchmark's accelerator
path (run here with a stand-in device: no accelerator is attached to CI)."""

import importlib.util
import sys
from pathlib import Path

import jax
import pytest

import opt_jax
from opt_jax.planning import roofline

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "device_kind, dtype, name, flops, bandwidth",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", "H100", 989e12, 3.35e12),
        ("NVIDIA H100 PCIe", "bfloat16", "H100 PCIe", 756e12, 2.0e12),
        ("NVIDIA H100 80GB HBM3", "float32", "H100", 494e12, 3.35e12),  # TF32 by default
        ("NVIDIA H200", "float16", "H200", 989e12, 4.8e12),
        ("NVIDIA A100-SXM4-40GB", "bfloat16", "A100-SXM4-40GB", 312e12, 1.555e12),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", "A100", 312e12, 2.0e12),
        ("TPU v4", "bfloat16", "TPU v4", 275e12, 1.2e12),
        ("TPU v5 lite", "float32", "TPU v5 lite", 197e12, 0.819e12),
        ("TPU v5", "bfloat16", "TPU v5", 459e12, 2.765e12),
        ("TPU v6 lite", "bfloat16", "TPU v6 lite", 918e12, 1.64e12),
    ],
)
def test_device_peaks_matches_the_most_specific_name(device_kind, dtype, name, flops, bandwidth):
    peaks = roofline.device_peaks(device_kind, dtype)
    assert peaks == {"flops": flops, "bandwidth": bandwidth, "name": name}


def test_device_peaks_unknown_device_and_bad_dtype():
    assert roofline.device_peaks("Tesla V100-SXM2-16GB", "float32") is None
    assert roofline.device_peaks("cpu", "float32") is None
    with pytest.raises(ValueError, match="dtype must be"):
        roofline.device_peaks("NVIDIA H100 80GB HBM3", "int8")


@pytest.mark.parametrize("size", ["125m", "350m"])
def test_model_flops_per_token_counts_every_matmul(size):
    """Counted independently from the parameter tree: every kernel (the LM head is tied to the
    embedding, which counts once as a matmul; 350m adds project_in / project_out), two FLOPs
    per weight, plus the attention score and value matmuls."""
    config = opt_jax.preset(size)
    decoder = opt_jax.abstract_params(config)["model"]["decoder"]
    kernels = [
        leaf.size
        for path, leaf in jax.tree_util.tree_leaves_with_path(decoder)
        if path[-1].key == "kernel"
    ]
    assert len(kernels) == 6 * config.num_hidden_layers + (2 if size == "350m" else 0)
    matmul_weights = sum(kernels) + decoder["embed_tokens"]["embedding"].size
    context = 256
    attention = 2 * 2 * config.num_hidden_layers * config.hidden_size * context  # q.k and p.v
    assert roofline.model_flops_per_token(config, context) == 2 * matmul_weights + attention


def test_decode_bytes_per_step():
    config = opt_jax.preset("125m")
    n_params = sum(x.size for x in jax.tree.leaves(opt_jax.abstract_params(config)))
    cache = 2 * 12 * 8 * 100 * 768  # k and v, 12 layers, batch 8, 100 positions, width 768
    assert roofline.decode_bytes_per_step(config, 8, 100, 2) == 2 * (n_params + cache)


class _FakeAccelerator:
    platform = "gpu"
    device_kind = "NVIDIA H100 80GB HBM3"

    def memory_stats(self):
        return {"peak_bytes_in_use": 3 * 2**30}


@pytest.fixture(scope="module")
def benchmark_module():
    # Loaded once: executing the script again defines its absl flags again, which absl refuses
    # when the new module object happens to reuse the old one's id.
    path = ROOT / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("benchmark_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _fixed_clock(bench, monkeypatch, seconds):
    """bench._time runs each measured call once and reports the next of `seconds` as its median
    (a clock the test sets, so rates are exact formula values). Returns the calls' count."""
    calls = []
    times = iter(seconds)

    def timed(fn, reps):
        fn()
        calls.append(reps)
        return 0.125, next(times)

    monkeypatch.setattr(bench, "_time", timed)
    return calls


SMOKE_READ_BYTES = 8 * 2**20 * 4  # _best_bandwidth's float32 array with smoke


def test_benchmark_on_an_accelerator_reports_mfu_and_hbm_against_the_data_sheet(
    benchmark_module, monkeypatch
):
    """The accelerator path of scripts/benchmark.py, with the device and the clock stood in for:
    bounds from the data sheet (measured peaks reported beside them), MFU and HBM utilisation
    per workload as their formulas give them, device memory, and a table that says where the
    bounds came from."""
    bench = benchmark_module
    real_cpu = jax.devices()[0]
    monkeypatch.setattr(jax, "devices", lambda *a: [_FakeAccelerator()])
    calls = _fixed_clock(bench, monkeypatch, [0.5] * 100)
    limits = bench.machine_limits("bfloat16", smoke=True)
    assert limits["flops"] == 989e12 and limits["bandwidth"] == 3.35e12
    assert limits["source"] == "H100 data sheet"
    assert len(calls) == 1 + 3  # one square matmul (512), three ways of reading memory
    assert limits["measured"]["flops"] == 2 * 512**3 / 0.5
    assert limits["measured"]["flops_how"] == "XLA [512,512]x[512,512]"
    assert limits["measured"]["bandwidth"] == SMOKE_READ_BYTES / 0.5
    assert bench._peak_device_mb() == 3 * 1024

    config = opt_jax.OPTConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
        num_attention_heads=4, max_position_embeddings=128,
    )  # fmt: skip
    with jax.default_device(real_cpu):
        results = bench.run_workloads(config, {"opt_jax": bench.Ours(config)}, True, 1, limits)
    assert [r["workload"] for r in results] == [
        "decode batch 1", "decode batch 8", "prefill 1 x 32", "train step 2 x 16"
    ]  # fmt: skip
    tokens = [1 * 8, 8 * 8, 32, 2 * 16]  # smoke: prompt 8 + 8 new tokens; prefill 32; 2 x 16
    for row, n in zip(results, tokens, strict=True):
        assert row["opt_jax"]["tokens_per_s"] == n / 0.5 and row["opt_jax"]["first_call_s"] == 0.125
    for row, batch in zip(results[:2], (1, 8), strict=True):  # bytes per step at context 8 + 4
        bound = batch * 3.35e12 / roofline.decode_bytes_per_step(config, batch, 12, 4)
        share = row["bandwidth_utilisation"]
        assert share == pytest.approx(batch * 8 / 0.5 / bound, rel=1e-12)
        assert row["bound"] == f"{share:.0%} of {bound:.0f} tok/s (HBM bandwidth)"
    prefill, step = results[2], results[3]
    per_token = roofline.model_flops_per_token(config, 32)
    assert prefill["mfu"] == pytest.approx(per_token * 32 / 0.5 / 989e12, rel=1e-12)
    per_token = roofline.model_flops_per_token(config, 16)
    assert step["mfu"] == pytest.approx(3 * per_token * 32 / 0.5 / 989e12, rel=1e-12)
    assert prefill["bound"] == f"MFU {prefill['mfu']:.0%}"
    decode = results[0]
    assert decode["opt_jax"]["peak_device_mb"] == 3 * 1024
    meta = {"device": "gpu: H100", "dtype": "bfloat16", "preset": "smoke", "date": "today",
            "limits": limits, "command": "python scripts/benchmark.py"}  # fmt: skip
    table = bench.markdown(results, meta)
    assert "(H100 data sheet); measured in this run: matmul" in table


def test_benchmark_on_cpu_measures_its_bounds(benchmark_module, monkeypatch):
    """On a CPU the bounds are the best measured rates: of XLA and numpy matmuls on the smoke
    shapes, and of three ways of reading memory (the clock stood in for, so which one wins and
    its rate are known exactly)."""
    # [256,256]x[256,256] by XLA, numpy; [64,64]x[64,128] by XLA, numpy; 3 reads of 32 MB
    seconds = [0.5, 0.25, 0.004, 0.002, 0.01, 0.02, 0.005]
    calls = _fixed_clock(benchmark_module, monkeypatch, seconds)
    limits = benchmark_module.machine_limits("float32", smoke=True)
    assert len(calls) == len(seconds)
    assert limits == {
        "flops": 2 * 64 * 64 * 128 / 0.002, "flops_how": "numpy [64,64]x[64,128]",
        "flops_tried": 4, "bandwidth": SMOKE_READ_BYTES / 0.005,
        "bandwidth_how": "XLA matrix-vector product", "source": "measured",
    }  # fmt: skip
