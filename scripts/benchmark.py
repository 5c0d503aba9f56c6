"""Benchmarks opt_jax against transformers' PyTorch OPT on the same machine, in the same run.

  python scripts/benchmark.py                      # 125m shape, float32, ours only
  python scripts/benchmark.py --compare hf         # interleaved with transformers (PyTorch)
  python scripts/benchmark.py --smoke              # tiny shape, a few tokens (CI keeps it alive)
  python scripts/benchmark.py --quantize llm_int8  # also: quantised decode vs our float32

Workloads (random weights): greedy decode at batch 1 and 8 (prompt 32, 128 new tokens, EOS
ignored), prefill (1 x 512), and a training step (4 x 256, AdamW + clipping, dropout on).
Each reports tokens/s (median of --reps timed repetitions after a warm-up call), the first
call's time (compilation for us), and the process's peak resident memory so far. The machine's
matmul peak and memory bandwidth are measured in the same run, and each workload is reported as
a fraction of its bound: decode against bytes moved per token / bandwidth, prefill and training
as model FLOPs utilisation (MFU) against the matmul peak. Writes JSON and a markdown table.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import opt_jax
from opt_jax.planning import roofline
from opt_jax.planning.roofline import decode_bytes_per_step, device_peaks, model_flops_per_token
from opt_jax.training import train
from opt_jax.training.experiment import base_config

flags.DEFINE_string("preset", "125m", "Model shape (random weights).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and parameter dtype.")
flags.DEFINE_enum("compare", None, ["hf"], "Also run transformers' PyTorch OPT, interleaved.")
flags.DEFINE_bool("smoke", False, "Tiny shape and few tokens: checks the script runs.")
flags.DEFINE_integer("reps", 3, "Timed repetitions per workload (the median is reported).")
flags.DEFINE_integer("threads", None, "Torch threads (default: this machine's core count).")
flags.DEFINE_string("measure_load", None, "(internal) see measure_load().")
flags.DEFINE_bool("scale", False, "Also: compile time vs depth (scan_layers) and load memory.")
flags.DEFINE_bool("sweep", False, "Also: a sampling sweep over traced values (recompiles?).")
flags.DEFINE_enum(
    "quantize", None, ["int8", "int4", "llm_int8"], "Also: decode with these weights vs float32."
)
flags.DEFINE_string("out", "benchmark_results", "Output prefix: writes OUT.json and OUT.md.")
FLAGS = flags.FLAGS


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, reps):
    """(first call seconds, median seconds of `reps` further calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


# ---------------------------------------------------------------------------------------------
# The machine's limits
# ---------------------------------------------------------------------------------------------
def _matmul_shapes(config, smoke: bool) -> list[tuple[int, int, int]]:
    """(M, K, N) of the peak measurement: squares of several sizes and the products the
    workloads themselves run (training's and prefill's token rows through the MLP, the attention
    projections and the LM head)."""
    if smoke:
        return [(256, 256, 256), (64, config.hidden_size, config.ffn_dim)]
    d, f, p, v = config.hidden_size, config.ffn_dim, config.word_embed_proj_dim, config.vocab_size
    shapes = [(n, n, n) for n in (1024, 2048, 4096)]
    for tokens in (1024, 512):  # train step 4 x 256, prefill 1 x 512
        shapes += [(tokens, d, f), (tokens, f, d), (tokens, d, d), (tokens, p, v)]
    return shapes


def _best_matmul(config, dtype: str, smoke: bool, torch_module=None) -> dict:
    """The highest matmul rate any of XLA, numpy's BLAS and (when loaded) PyTorch reaches on
    _matmul_shapes, each timed as the median of a few calls."""
    reps = 2 if smoke else 3
    rng = np.random.default_rng(0)
    candidates = []
    matmul = jax.jit(jnp.matmul)
    for m, k, n in _matmul_shapes(config, smoke):
        a32, b32 = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
        a, b = jnp.asarray(a32, dtype), jnp.asarray(b32, dtype)
        runs = {"XLA": lambda a=a, b=b: matmul(a, b).block_until_ready()}
        if dtype == "float32":  # numpy has no bfloat16 BLAS
            runs["numpy"] = lambda a=a32, b=b32: a @ b
        if torch_module is not None:
            ta = torch_module.from_numpy(a32).to(getattr(torch_module, dtype))
            tb = torch_module.from_numpy(b32).to(getattr(torch_module, dtype))
            runs["PyTorch"] = lambda a=ta, b=tb: a @ b
        for library, run in runs.items():
            _, seconds = _time(run, reps)
            candidates.append(
                {"how": f"{library} [{m},{k}]x[{k},{n}]", "flops": 2 * m * k * n / seconds}
            )
    return max(candidates, key=lambda c: c["flops"]) | {"tried": len(candidates)}


def _best_bandwidth(smoke: bool) -> dict:
    """The highest read bandwidth of: an XLA reduction, a numpy reduction and an XLA
    matrix-vector product (what batch-1 decoding does), each over an array far larger than
    the caches (256 MB; 32 MB with smoke)."""
    reps = 3 if smoke else 10
    n = (8 if smoke else 64) * 2**20
    host = np.ones((n,), np.float32)
    big = jnp.asarray(host)
    total = jax.jit(jnp.sum)
    matrix = jnp.ones((2048, n // 2048), jnp.float32)
    vector = jnp.ones((1, 2048), jnp.float32)
    gemv = jax.jit(jnp.matmul)
    runs = {
        "XLA reduction": lambda: total(big).block_until_ready(),
        "numpy reduction": lambda: host.sum(),
        "XLA matrix-vector product": lambda: gemv(vector, matrix).block_until_ready(),
    }
    candidates = []
    for how, run in runs.items():
        _, seconds = _time(run, reps)
        candidates.append({"how": how, "bandwidth": host.nbytes / seconds})
    return max(candidates, key=lambda c: c["bandwidth"])


def machine_limits(dtype: str, smoke: bool, config=None, torch_module=None) -> dict:
    """The bounds each workload is measured against.

    Always measured in this run. The matmul peak is the best rate of several libraries over
    several shapes, the workloads' own among them (_best_matmul): a peak from one square
    matmul in one library can sit below what the workloads reach, and then MFU exceeds 100%.
    The bandwidth is the best of three ways of streaming 256 MB (_best_bandwidth). On an
    accelerator listed in roofline.ACCELERATOR_PEAKS the data-sheet peaks are the bounds (MFU
    and HBM utilisation as usually quoted), with the measured ones reported next to them.
    """
    device = jax.devices()[0]
    if config is None:
        config = opt_jax.OPTConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
            num_attention_heads=4, max_position_embeddings=128,
        )  # fmt: skip
    if device.platform != "cpu":  # one large square matmul is the accelerator's best case
        n = 512 if smoke else 8192
        a = jnp.ones((n, n), dtype)
        matmul = jax.jit(lambda x: x @ x)
        _, seconds = _time(lambda: matmul(a).block_until_ready(), 3 if smoke else 10)
        flops = {"how": f"XLA [{n},{n}]x[{n},{n}]", "flops": 2 * n**3 / seconds, "tried": 1}
    else:
        flops = _best_matmul(config, dtype, smoke, torch_module)
    bandwidth = _best_bandwidth(smoke)
    measured = {
        "flops": flops["flops"], "flops_how": flops["how"], "flops_tried": flops["tried"],
        "bandwidth": bandwidth["bandwidth"], "bandwidth_how": bandwidth["how"],
        "source": "measured",
    }  # fmt: skip
    sheet = None if device.platform == "cpu" else device_peaks(device.device_kind, dtype)
    if sheet is None:
        return measured
    return {"flops": sheet["flops"], "bandwidth": sheet["bandwidth"],
            "source": f"{sheet['name']} data sheet", "measured": measured}  # fmt: skip


def _peak_device_mb() -> float | None:
    """Peak accelerator memory in use so far (None where the backend keeps no statistics)."""
    stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------
class Ours:
    def __init__(self, config):
        self.config = config
        self.model = opt_jax.OPTForCausalLM(config)
        self.params = opt_jax.init_params(config, 0)
        self.forward = jax.jit(lambda p, ids: self.model.apply({"params": p}, ids).logits)
        optim = base_config().optim
        self.tx = train.make_optimizer(optim, 1000)
        self.state = train.fresh_state(self.params, self.tx)
        self.step = jax.jit(
            lambda s, b, r: train.train_step(s, b, r, model=self.model, tx=self.tx, optim=optim),
            donate_argnums=(0,),
        )

    def decode(self, ids, new_tokens):
        out = opt_jax.generate(
            self.model, self.params, ids, max_new_tokens=new_tokens, eos_token_id=[]
        )
        assert out.sequences.shape[1] == ids.shape[1] + new_tokens

    def prefill(self, ids):
        self.forward(self.params, ids).block_until_ready()

    def train_step(self, ids):
        batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones(ids.shape, jnp.int32)}
        self.state, metrics = self.step(self.state, batch, jax.random.key(0))
        jax.block_until_ready(metrics)


class HuggingFace:
    def __init__(self, config, threads):
        import torch
        import transformers

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch = torch
        # Same kind of device as ours where torch can reach it (a CUDA build on a GPU machine).
        on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        hf_config = transformers.OPTConfig(
            **{k: v for k, v in config.to_hf().items() if k != "dtype"}
        )
        dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
        self.model = transformers.OPTForCausalLM(hf_config).to(self.device, dtype).eval()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1
        )

    def _tensor(self, ids):
        return self.torch.tensor(ids, dtype=self.torch.long, device=self.device)

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def decode(self, ids, new_tokens):
        with self.torch.no_grad():
            ids = self._tensor(ids)
            out = self.model.generate(
                ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, pad_token_id=1,
            )  # fmt: skip
        assert out.shape[1] == ids.shape[1] + new_tokens

    def prefill(self, ids):
        with self.torch.no_grad():
            self.model(self._tensor(ids))
        self._sync()

    def train_step(self, ids):
        self.model.train()
        ids = self._tensor(ids)
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.model.eval()
        self._sync()


def run_workloads(config, peers, smoke, reps, limits):
    rng = np.random.RandomState(0)
    vocab = min(config.vocab_size, 50265)
    prompt, new = (8, 8) if smoke else (32, 128)
    prefill_len = 32 if smoke else 512
    train_shape = (2, 16) if smoke else (4, 256)
    itemsize = jnp.dtype(config.dtype).itemsize
    workloads = [
        ("decode batch 1", "decode", (1, prompt), 1 * new),
        ("decode batch 8", "decode", (8, prompt), 8 * new),
        (f"prefill 1 x {prefill_len}", "prefill", (1, prefill_len), prefill_len),
        (f"train step {train_shape[0]} x {train_shape[1]}", "train_step", train_shape,
         train_shape[0] * train_shape[1]),
    ]  # fmt: skip
    results = []
    for name, method, shape, tokens in workloads:
        ids = rng.randint(4, vocab, size=shape).astype(np.int32)
        row = {"workload": name}
        for peer_name, peer in peers.items():
            fn = getattr(peer, method)
            args = (ids, new) if method == "decode" else (ids,)
            call = lambda f=fn, a=args: f(*a)  # noqa: E731
            first, median = _time(call, reps)
            row[peer_name] = {
                "tokens_per_s": tokens / median,
                "first_call_s": first,
                "peak_rss_mb": _peak_rss_mb(),
            }
            if peer_name == "opt_jax" and _peak_device_mb() is not None:
                row[peer_name]["peak_device_mb"] = _peak_device_mb()
        ours = row["opt_jax"]["tokens_per_s"]
        if method == "decode":
            batch = shape[0]
            step_bytes = decode_bytes_per_step(config, batch, prompt + new // 2, itemsize)
            bound = batch * limits["bandwidth"] / step_bytes
            row["bandwidth_utilisation"] = ours / bound
            memory = "HBM" if jax.devices()[0].platform != "cpu" else "memory"
            row["bound"] = f"{ours / bound:.0%} of {bound:.0f} tok/s ({memory} bandwidth)"
        else:
            context = shape[1]
            factor = 3 if method == "train_step" else 1  # forward + backward = 3 x forward
            flops = factor * model_flops_per_token(config, context) * ours
            row["mfu"] = flops / limits["flops"]
            row["bound"] = f"MFU {row['mfu']:.0%}"
        if "hf" in row:
            row["ratio"] = ours / row["hf"]["tokens_per_s"]
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def quantized_decode_results(config, smoke: bool, reps: int, method: str) -> list[dict]:
    """Decode tokens/s with `method`'s weights against our float32 weights (the same random
    model), batch 1 and 8 (smoke: 1), the two timed in alternation so that the machine's drift
    hits both."""
    params = opt_jax.init_params(config, 0)
    qconfig, qparams = opt_jax.quantize(config, params, method)
    prompt, new = (8, 8) if smoke else (32, 128)
    rows = []
    for batch in (1,) if smoke else (1, 8):
        ids = np.random.RandomState(0).randint(4, min(config.vocab_size, 50265), (batch, prompt))
        runs = {
            name: lambda c=c, p=p, ids=ids: opt_jax.generate(
                opt_jax.OPTForCausalLM(c), p, ids, max_new_tokens=new, eos_token_id=[]
            )
            for name, (c, p) in (("float32", (config, params)), (method, (qconfig, qparams)))
        }
        times = {name: [] for name in runs}
        for run in runs.values():
            run()  # compile
        for _ in range(reps):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        speed = {name: batch * new / statistics.median(t) for name, t in times.items()}
        row = {
            "workload": f"decode batch {batch}, {method} weights",
            "tokens_per_s": speed[method],
            "float32_tokens_per_s": speed["float32"],
            "vs_float32": speed[method] / speed["float32"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def compile_seconds(config, smoke: bool) -> dict:
    """Lower + compile time of the training step and of generation, from shapes only."""
    from opt_jax.generation import api

    model = opt_jax.OPTForCausalLM(config)
    optim = base_config().optim
    tx = train.make_optimizer(optim, 1000)
    state = jax.eval_shape(lambda: train.fresh_state(opt_jax.init_params(config, 0), tx))
    shape = (2, 16) if smoke else (4, 256)
    tokens = jax.ShapeDtypeStruct(shape, jnp.int32)
    step = jax.jit(lambda s, b, r: train.train_step(s, b, r, model=model, tx=tx, optim=optim))
    start = time.perf_counter()
    step.lower(state, {"input_ids": tokens, "attention_mask": tokens}, jax.random.key(0)).compile()
    train_s = time.perf_counter() - start
    cfg = opt_jax.GenerationConfig(max_new_tokens=128).for_model(config)
    generate = api._compiled(config, cfg.program(), False)
    values = {name: jnp.float32(v) for name, v in cfg.values().items()}
    prompt = jax.ShapeDtypeStruct((1, 32), jnp.int32)
    start = time.perf_counter()
    mask, stream_id = jax.ShapeDtypeStruct((1, 32), bool), jax.ShapeDtypeStruct((), jnp.int32)
    head = jax.ShapeDtypeStruct((config.word_embed_proj_dim, config.vocab_size), config.dtype)
    generate.lower(
        state.params, head, prompt, mask, jax.random.key(0), values, 128, stream_id, 160
    ).compile()
    return {"train_step": train_s, "generate": time.perf_counter() - start}


def scale_results(smoke: bool) -> list[dict]:
    """Compile time at 12 and 48 layers (125m width), with and without scan_layers."""
    rows = []
    base = opt_jax.preset("125m") if not smoke else opt_jax.OPTConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
        max_position_embeddings=256,
    )  # fmt: skip
    depths = (2, 4) if smoke else (12, 48)
    for scan in (True, False):
        times = [
            compile_seconds(base.replace(num_hidden_layers=d, scan_layers=scan), smoke)
            for d in depths
        ]
        for kind in ("train_step", "generate"):
            row = {
                "workload": f"compile {kind}, {'scan' if scan else 'unrolled'}",
                "seconds": {str(d): t[kind] for d, t in zip(depths, times, strict=True)},
                "ratio_deep_to_shallow": times[1][kind] / times[0][kind],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def sweep_result(config, smoke: bool) -> dict:
    """A notebook-style sampling sweep: the first call (compiles), then new temperature / top_p
    values on the same shapes, which are traced arguments of the same program."""
    from opt_jax.generation import api

    model = opt_jax.OPTForCausalLM(config)
    params = opt_jax.init_params(config, 0)
    ids = np.random.RandomState(0).randint(3, config.vocab_size, (1, 32))
    new = 8 if smoke else 32

    def call(temperature, top_p):
        opt_jax.generate(model, params, ids, max_new_tokens=new, do_sample=True,
                         temperature=temperature, top_p=top_p, eos_token_id=[], seed=0)  # fmt: skip

    start = time.perf_counter()
    call(1.0, 0.9)
    first = time.perf_counter() - start
    traces, times = api.TRACE_COUNT["n"], []
    for temperature, top_p in [(0.7, 0.9), (0.7, 0.95), (1.3, 0.5), (0.5, 0.8)]:
        start = time.perf_counter()
        call(temperature, top_p)
        times.append(time.perf_counter() - start)
    return {
        "workload": f"sampling sweep (prompt 32, {new} new tokens)",
        "first_call_s": first,
        "later_calls_s": times,
        "median_later_to_first": statistics.median(times) / first,
        "recompiles": api.TRACE_COUNT["n"] - traces,
    }


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return _peak_rss_mb()


def measure_load(directory: str) -> None:
    """(Run in a subprocess with 8 CPU devices.) Loads an HF checkpoint straight into an
    fsdp=8 sharding and prints peak host memory growth relative to the checkpoint's size."""
    from opt_jax.parallel import sharding

    config = opt_jax.OPTConfig.from_hf(directory)
    mesh = sharding.make_mesh(1, len(jax.devices()), 1)
    shardings = sharding.logical_to_shardings(opt_jax.param_logical_axes(config), mesh)
    import threading

    jax.device_put(jnp.zeros(8), shardings["model"]["decoder"]["final_layer_norm"]["bias"])
    before, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():  # the process-lifetime ru_maxrss would include start-up transients
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    params = opt_jax.load_pretrained(directory, shardings=shardings)[1]
    jax.block_until_ready(params)
    done.set()
    sampler.join()
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    peak = max(peak[0], _rss_mb()) - before
    print(json.dumps({"checkpoint_mb": size / 2**20, "peak_growth_mb": peak,
                      "ratio": peak / (size / 2**20)}))  # fmt: skip


def load_memory_result(smoke: bool) -> dict:
    import subprocess
    import sys
    import tempfile

    config = opt_jax.preset("125m") if not smoke else opt_jax.OPTConfig(
        vocab_size=4096, hidden_size=128, num_hidden_layers=2, ffn_dim=512, num_attention_heads=4,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        opt_jax.save_pretrained(directory, config, opt_jax.init_params(config, 0))
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
        out = subprocess.run(
            [sys.executable, __file__, "--measure_load", directory], env=env, check=True,
            capture_output=True, text=True,
        ).stdout  # fmt: skip
    row = json.loads(out.strip().splitlines()[-1])
    row["workload"] = "load HF checkpoint into fsdp=8 (peak host memory / checkpoint size)"
    print(json.dumps(row), flush=True)
    return row


def markdown(results, meta) -> str:
    has_hf = any("hf" in r for r in results)
    head = "| workload | opt_jax tok/s | first call (s) |"
    head += " HF PyTorch tok/s | ratio |" if has_hf else ""
    head += " vs bound |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        ours = r["opt_jax"]
        line = f"| {r['workload']} | {ours['tokens_per_s']:.1f} | {ours['first_call_s']:.1f} |"
        if has_hf:
            line += f" {r['hf']['tokens_per_s']:.1f} | {r['ratio']:.2f}x |"
        line += f" {r['bound']} |"
        lines.append(line)
    lines.append("")
    lines.append(
        f"{meta['device']}; CPU {meta.get('cpu', 'not recorded')}; {meta['dtype']}, shape "
        f"{meta['preset']}, {meta['date']}; matmul peak {meta['limits']['flops'] / 1e9:.0f} "
        f"GFLOP/s, memory bandwidth {meta['limits']['bandwidth'] / 1e9:.1f} GB/s "
        f"({meta['limits']['source']}{_how(meta['limits'])})"
        + _measured_note(meta["limits"])
        + (f"; HF PyTorch on {meta['hf_device']}" if has_hf else "")
        + f". Command: `{meta['command']}`"
    )
    return "\n".join(lines)


def _how(limits: dict) -> str:
    """Which measurement set a measured bound."""
    if "flops_how" not in limits:
        return ""
    return (
        f": best matmul of {limits['flops_tried']} tried, {limits['flops_how']}; best read, "
        f"{limits['bandwidth_how']}"
    )


def _measured_note(limits: dict) -> str:
    if "measured" not in limits:
        return ""
    m = limits["measured"]
    return (
        f"; measured in this run: matmul {m['flops'] / 1e12:.0f} TFLOP/s, memory read "
        f"{m['bandwidth'] / 1e9:.0f} GB/s"
    )


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.measure_load:
        return measure_load(FLAGS.measure_load)
    if FLAGS.smoke:
        config = opt_jax.OPTConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
            num_attention_heads=4, max_position_embeddings=128,
        )  # fmt: skip
    else:
        config = opt_jax.preset(FLAGS.preset)
    config = config.replace(dtype=FLAGS.dtype, param_dtype=FLAGS.dtype)
    threads = FLAGS.threads or os.cpu_count()
    reps = 1 if FLAGS.smoke else FLAGS.reps
    peers = {"opt_jax": Ours(config)}
    if FLAGS.compare == "hf":
        peers["hf"] = HuggingFace(config, threads)
    torch_module = peers["hf"].torch if "hf" in peers and peers["hf"].device.type == "cpu" else None
    limits = machine_limits(FLAGS.dtype, FLAGS.smoke, config, torch_module)
    results = run_workloads(config, peers, FLAGS.smoke, reps, limits)
    device = jax.devices()[0]
    meta = {
        "preset": "smoke" if FLAGS.smoke else FLAGS.preset,
        "dtype": FLAGS.dtype,
        "device": f"{device.platform}: {device.device_kind}",
        "cpu": roofline.describe_cpu(),
        "torch_threads": threads,
        "hf_device": str(peers["hf"].device) if "hf" in peers else None,
        "date": time.strftime("%Y-%m-%d"),
        "limits": limits,
        "command": " ".join(
            ["python scripts/benchmark.py"]
            + (["--smoke"] if FLAGS.smoke else [f"--preset {FLAGS.preset}"])
            + ([f"--dtype {FLAGS.dtype}"] if FLAGS.dtype != "float32" else [])
            + ([f"--compare {FLAGS.compare}"] if FLAGS.compare else [])
            + ([f"--quantize {FLAGS.quantize}"] if FLAGS.quantize else [])
        ),
    }
    table = markdown(results, meta)
    if FLAGS.scale:
        scale = scale_results(FLAGS.smoke)
        depths = list(scale[0]["seconds"])
        table += (
            f"\n\n| compile time (s) | {depths[0]} layers | {depths[1]} layers | ratio |\n"
            "|---|---|---|---|\n"
        )
        for r in scale:
            a, b = (r["seconds"][d] for d in depths)
            table += (
                f"| {r['workload']} | {a:.1f} | {b:.1f} | {r['ratio_deep_to_shallow']:.2f}x |\n"
            )
        load = load_memory_result(FLAGS.smoke)
        table += (
            f"\nLoading a {load['checkpoint_mb']:.0f} MB HF checkpoint into an fsdp=8 sharding: "
            f"peak host memory growth {load['peak_growth_mb']:.0f} MB = "
            f"{load['ratio']:.2f}x its size.\n"
        )
        results = results + scale + [load]
    if FLAGS.quantize:
        quantized = quantized_decode_results(config, FLAGS.smoke, reps, FLAGS.quantize)
        table += "\n\n| workload | tok/s | our float32 tok/s | vs float32 |\n|---|---|---|---|\n"
        for r in quantized:
            table += (
                f"| {r['workload']} | {r['tokens_per_s']:.1f} | "
                f"{r['float32_tokens_per_s']:.1f} | {r['vs_float32']:.2f}x |\n"
            )
        results = results + quantized
    if FLAGS.sweep:
        sweep = sweep_result(config, FLAGS.smoke)
        table += (
            f"\n{sweep['workload']}: first call {sweep['first_call_s']:.1f} s; calls with new "
            "temperature / top_p values "
            + ", ".join(f"{t:.2f}" for t in sweep["later_calls_s"])
            + f" s (median {sweep['median_later_to_first']:.0%} of the first), "
            f"{sweep['recompiles']} recompilations.\n"
        )
        results = results + [sweep]
    with open(FLAGS.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    with open(FLAGS.out + ".md", "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    app.run(main)
