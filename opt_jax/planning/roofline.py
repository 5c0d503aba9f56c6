"""What a workload could do at best: model FLOPs, bytes moved per decode step, device peaks.

Used by scripts/benchmark.py (fraction of bound for every workload) and by the training loop
(MFU in its metrics on accelerators whose peak is known).
"""

from __future__ import annotations

import os
import platform

import jax

from opt_jax.config import OPTConfig
from opt_jax.model import abstract_params

# Dense (no structured sparsity) matmul peak FLOP/s and HBM bandwidth in bytes/s, from the
# vendors' data sheets. "float32" is what a float32 matmul gets under JAX's default precision:
# TF32 tensor cores on NVIDIA Ampere and later, one bfloat16 pass on TPU (see the "Matmul
# precision" page of the JAX docs). Keys are matched against `jax.Device.device_kind`,
# longest first, so "H100 PCIe" wins over "H100" and "TPU v5 lite" over "TPU v5".
ACCELERATOR_PEAKS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bfloat16": 756e12, "float32": 378e12, "bandwidth": 2.0e12},
    "H100": {"bfloat16": 989e12, "float32": 494e12, "bandwidth": 3.35e12},  # SXM5
    "H200": {"bfloat16": 989e12, "float32": 494e12, "bandwidth": 4.8e12},
    "A100-SXM4-40GB": {"bfloat16": 312e12, "float32": 156e12, "bandwidth": 1.555e12},
    "A100-PCIE-40GB": {"bfloat16": 312e12, "float32": 156e12, "bandwidth": 1.555e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12, "bandwidth": 2.0e12},  # 80 GB
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12, "bandwidth": 1.2e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12, "bandwidth": 0.819e12},  # v5e
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12, "bandwidth": 2.765e12},  # v5p
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12, "bandwidth": 1.64e12},  # v6e
}


def device_peaks(device_kind: str, dtype: str) -> dict | None:
    """Data-sheet peaks of a device, or None when the device is not in ACCELERATOR_PEAKS.

    Args:
      device_kind: `jax.Device.device_kind`, e.g. "NVIDIA H100 80GB HBM3" or "TPU v5 lite".
      dtype: the matmul dtype, "float32" or "bfloat16" (float16 counts as bfloat16).

    Returns:
      {"flops": matmul FLOP/s, "bandwidth": bytes/s, "name": the matched table key} or None.
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    kind = device_kind.lower()
    for name in sorted(ACCELERATOR_PEAKS, key=len, reverse=True):
        if name.lower() in kind:
            peaks = ACCELERATOR_PEAKS[name]
            flops = peaks["float32" if dtype == "float32" else "bfloat16"]
            return {"flops": flops, "bandwidth": peaks["bandwidth"], "name": name}
    return None


def local_device_peaks(dtype: str) -> dict | None:
    """device_peaks() of this process's first device; None on CPU or an unknown accelerator."""
    device = jax.local_devices()[0]
    return None if device.platform == "cpu" else device_peaks(device.device_kind, dtype)


def model_flops_per_token(config: OPTConfig, context: int) -> float:
    """Forward FLOPs per token at a given context length.

    2 x (matmul parameters) + the attention score and value matmuls (4 x layers x hidden x
    context), PaLM's convention (Chowdhery et al. 2022, appendix B); a training step is 3x this
    (forward + backward), whatever rematerialisation recomputes.
    """
    d, f, layers = config.hidden_size, config.ffn_dim, config.num_hidden_layers
    matmul_params = (
        layers * (4 * d * d + 2 * d * f) + config.vocab_size * config.word_embed_proj_dim
    )
    if config.has_projections:
        matmul_params += 2 * d * config.word_embed_proj_dim
    return 2 * matmul_params + 4 * layers * d * context


def decode_bytes_per_step(config: OPTConfig, batch: int, context: int, itemsize: int) -> float:
    """Bytes one decode step must read at least: every weight once, plus the batch's KV cache of
    `context` positions (keys and values, every layer)."""
    params = sum(x.size for x in jax.tree.leaves(abstract_params(config)))
    cache = 2 * config.num_hidden_layers * batch * context * config.hidden_size
    return (params + cache) * itemsize


# The vector and matrix extensions that decide a CPU's matmul and bandwidth peaks, as
# /proc/cpuinfo names them (x86; "asimd", "sve" on ARM).
CPU_FEATURES = (
    "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_bf16", "amx_int8", "asimd", "sve", "sve2",
)  # fmt: skip


def cpu_description() -> dict:
    """This machine's CPU: model name, the CPU_FEATURES it has, and its core count.

    Benchmarks print it beside every number, so results from machines of the same nominal kind
    (an AVX-512 and an AVX2-only AMD EPYC differ ~3x in matmul peak) are never taken for one.
    Read from /proc/cpuinfo (Linux); elsewhere only platform.processor() is known.
    """
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and model in ("", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    features = [f for f in CPU_FEATURES if f in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "features": features, "cores": cores}


def describe_cpu(info: dict | None = None) -> str:
    """One line: "Intel(R) Xeon(R) ... (avx2 fma avx512f ...), 2 cores"."""
    info = info or cpu_description()
    features = " ".join(info["features"]) or "no vector extensions listed"
    return f"{info['model']} ({features}), {info['cores']} cores"
