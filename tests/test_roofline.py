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


def test_benchmark_on_an_accelerator_reports_mfu_and_hbm_against_the_data_sheet(
    benchmark_module, monkeypatch
):
    """The accelerator path of scripts/benchmark.py, with the device stood in for: bounds from
    the data sheet (measured peaks reported beside them), MFU and HBM utilisation per workload,
    device memory, and a table that says where the bounds came from."""
    bench = benchmark_module
    real_cpu = jax.devices()[0]
    monkeypatch.setattr(jax, "devices", lambda *a: [_FakeAccelerator()])
    limits = bench.machine_limits("bfloat16", smoke=True)
    assert limits["flops"] == 989e12 and limits["bandwidth"] == 3.35e12
    assert limits["source"] == "H100 data sheet"
    assert limits["measured"]["flops"] > 0 and limits["measured"]["bandwidth"] > 0
    assert bench._peak_device_mb() == 3 * 1024

    config = opt_jax.OPTConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
        num_attention_heads=4, max_position_embeddings=128,
    )  # fmt: skip
    with jax.default_device(real_cpu):
        results = bench.run_workloads(config, {"opt_jax": bench.Ours(config)}, True, 1, limits)
    decode, prefill = results[0], results[2]
    assert 0 < decode["bandwidth_utilisation"] < 1e-2  # a tiny model on a CPU vs an H100's HBM
    assert "HBM bandwidth" in decode["bound"]
    assert 0 < prefill["mfu"] < 1e-2 and prefill["bound"].startswith("MFU")
    assert decode["opt_jax"]["peak_device_mb"] == 3 * 1024
    meta = {"device": "gpu: H100", "dtype": "bfloat16", "preset": "smoke", "date": "today",
            "limits": limits, "command": "python scripts/benchmark.py"}  # fmt: skip
    table = bench.markdown(results, meta)
    assert "(H100 data sheet); measured in this run: matmul" in table


def test_benchmark_on_cpu_measures_its_bounds(benchmark_module):
    limits = benchmark_module.machine_limits("float32", smoke=True)
    assert limits["source"] == "measured" and "measured" not in limits
    assert limits["flops"] > 1e8 and limits["bandwidth"] > 1e8
