"""Layer-streamed generation from disk against Hugging Face Accelerate's disk offload, one run.

  python scripts/random_checkpoint.py --out ckpt/opt-1.3b --preset 1.3b --dtype float16
  python scripts/benchmark_offload.py --model ckpt/opt-1.3b --memory_limit 1GB --batches 1,32 \
      --output experiments/offload/1.3b.json
  python scripts/benchmark_offload.py --model ckpt/opt-13b --memory_limit 8GB --batches 1 \
      --accelerate=false --drop_page_cache --output experiments/offload/13b.json

For each batch size: ours (`load_pretrained(offload="disk", memory_limit=...)`, float32
compute from the stored weights) and Accelerate (transformers `from_pretrained(device_map="auto",
max_memory={"cpu": LIMIT}, offload_folder=...)` in the checkpoint's dtype) each generate
--new_tokens greedy tokens from --prompt_len-token prompts, in a fresh process each, after a
warm-up call. Reported: tokens/s (batch x new tokens / seconds, prefill included), seconds per
decode step ((t(N) - t(2)) / (N - 2)), the process's peak resident memory, and for ours the
bytes read per decode step against the disk's sequential read rate measured here on the
checkpoint's own files with the page cache dropped (the time those bytes take from disk: the
bound a disk-streamed decode step cannot beat unless the page cache holds the file).

--drop_page_cache asks the kernel to drop the checkpoint's pages after each layer read (what a
model larger than memory gets anyway), so every step reads from the disk.

--cgroup_memory 2.5GB runs each process in a fresh memory cgroup capped at that size, which the
kernel charges with the process's memory and the page cache it fills: on a machine whose RAM
holds the checkpoint many times this is how both libraries see a model larger than memory (the
page cache cannot serve their reads), which is FlexGen's setting and what the speed targets of
issue #27 assume. Needs a writable cgroup hierarchy (v1 memory controller or v2; root in a
container usually has one); each cgroup's peak usage is reported.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("model", None, "HF directory (safetensors) to stream.", required=True)
flags.DEFINE_string("memory_limit", "1GB", "Memory limit for both (ours: memory_limit=).")
flags.DEFINE_list("batches", ["1", "32"], "Batch sizes.")
flags.DEFINE_integer("new_tokens", 8, "New tokens per call (at least 3).")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
flags.DEFINE_bool("accelerate", True, "Also run Accelerate's disk offload.")
flags.DEFINE_bool("drop_page_cache", False, "Drop the checkpoint's pages after every read.")
flags.DEFINE_string(
    "cgroup_memory", None, "Run each process in a memory cgroup capped at this size (e.g. 2.5GB)."
)
flags.DEFINE_string("output", None, "Write the results as JSON here.")
flags.DEFINE_string("_child", None, "Internal: run one measurement (ours|accelerate).")
flags.DEFINE_integer("_batch", 1, "Internal: the child's batch size.")
FLAGS = flags.FLAGS


def _weight_files(model):
    from opt_jax.checkpoints.hf_files import weight_files

    return weight_files(model)


def _drop(files):
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def disk_read_rate(files, limit=2 * 10**9) -> float:
    """Bytes/s reading the checkpoint's files sequentially from disk (page cache dropped)."""
    import numpy as np

    _drop(files)
    buffer = np.empty(64 * 2**20, np.uint8)
    done, began = 0, time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        offset = 0
        while done < limit:
            got = os.preadv(fd, [memoryview(buffer)], offset)
            if not got:
                break
            offset, done = offset + got, done + got
        os.close(fd)
    rate = done / (time.perf_counter() - began)
    _drop(files)
    return rate


def _prompts(batch, length, vocab):
    import numpy as np

    return np.random.default_rng(0).integers(3, min(vocab, 50000), (batch, length))


def _child_ours(batch):
    import numpy as np

    import opt_jax

    config, source = opt_jax.load_pretrained(
        FLAGS.model, offload="disk", memory_limit=FLAGS.memory_limit, dtype="float32",
        param_dtype="float32",
    )  # fmt: skip
    source.drop_page_cache = FLAGS.drop_page_cache
    plans = []  # (batch, buffer length, prompt length) and the plan of each call
    planner = source.plan
    source.plan = lambda *request: plans.append((request, planner(*request))) or plans[-1][1]
    model = opt_jax.OPTForCausalLM(config)
    ids = _prompts(batch, FLAGS.prompt_len, config.vocab_size)
    opt_jax.generate(model, source, ids, max_new_tokens=2, eos_token_id=[])  # compiles

    def timed(n):
        before = dict(source.stats)
        began = time.perf_counter()
        opt_jax.generate(model, source, ids, max_new_tokens=n, eos_token_id=[])  # no early end
        return time.perf_counter() - began, {k: source.stats[k] - before[k] for k in before}

    short, _ = timed(2)
    total, stats = timed(FLAGS.new_tokens)
    (_, buffer_length, _), plan = plans[-1]
    streamed = config.num_hidden_layers - len(plan.resident_layers)
    itemsize = np.dtype(config.dtype).itemsize  # the cache's dtype
    cache_read = len(plan.cache_on_disk) * batch * 2 * buffer_length * config.hidden_size * itemsize
    return {
        "seconds": total,
        "step_seconds": (total - short) / (FLAGS.new_tokens - 2),
        "streamed_layers": streamed,
        "micro_batch_rows": plan.decode_rows,
        "buffer_length": buffer_length,
        # The weights streamed and the KV cache read from disk by one decode step.
        "bytes_per_step": streamed * source.layer_bytes + cache_read,
        "read_seconds": stats["read_seconds"],
        "bytes_read": stats["bytes_read"],
        "cache_layers_on_disk": len(plan.cache_on_disk),
        "cache_bytes_read": stats.get("cache_bytes_read", 0),
        "cache_bytes_written": stats.get("cache_bytes_written", 0),
    }


def _child_accelerate(batch):
    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(FLAGS.model))) as off:
        model = AutoModelForCausalLM.from_pretrained(
            FLAGS.model, device_map="auto", max_memory={"cpu": FLAGS.memory_limit},
            offload_folder=off,
        )  # fmt: skip
        ids = torch.tensor(_prompts(batch, FLAGS.prompt_len, model.config.vocab_size))

        def timed(n):
            began = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return time.perf_counter() - began

        timed(2)
        short = timed(2)
        total = timed(FLAGS.new_tokens)
        placement = {}
        for where in model.hf_device_map.values():
            placement[str(where)] = placement.get(str(where), 0) + 1
    return {
        "seconds": total,
        "step_seconds": (total - short) / (FLAGS.new_tokens - 2),
        "placement": placement,
    }


def _memory_cgroup(limit: int, name: str) -> tuple[str, str]:
    """A fresh memory cgroup under this process's own, capped at `limit` bytes: (its directory,
    the file that reads its peak usage). cgroup v1's memory controller or cgroup v2."""
    with open("/proc/self/cgroup") as f:
        entries = [line.rstrip("\n").split(":", 2) for line in f]
    v1 = [path for _, controllers, path in entries if "memory" in controllers.split(",")]
    if v1:
        parent = "/sys/fs/cgroup/memory" + v1[0]
        limit_file, peak_file = "memory.limit_in_bytes", "memory.max_usage_in_bytes"
    else:
        v2 = [path for hierarchy, _, path in entries if hierarchy == "0"]
        parent = "/sys/fs/cgroup" + (v2 or ["/"])[0]
        limit_file, peak_file = "memory.max", "memory.peak"
    path = os.path.join(parent, name)
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, limit_file), "w") as f:
            f.write(str(limit))
    except OSError as e:
        raise app.UsageError(
            f"--cgroup_memory needs a writable memory cgroup: creating {path} failed ({e})"
        ) from e
    return path, os.path.join(path, peak_file)


def _run_child(kind, batch):
    command = [sys.executable, __file__, f"--_child={kind}", f"--_batch={batch}"] + [
        f"--{name}={FLAGS[name].value}"
        for name in ("model", "memory_limit", "new_tokens", "prompt_len", "drop_page_cache")
    ]
    cgroup = peak = enter = None
    if FLAGS.cgroup_memory:
        from opt_jax.checkpoints.offload import parse_bytes

        limit = parse_bytes(FLAGS.cgroup_memory)
        cgroup, peak = _memory_cgroup(limit, f"opt_jax_benchmark_{os.getpid()}_{kind}_{batch}")

        def enter():  # in the child, before it runs: join the cgroup
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    try:
        done = subprocess.run(command, capture_output=True, text=True, preexec_fn=enter)
        used = None
        if peak and os.path.exists(peak):
            with open(peak) as f:
                used = int(f.read())
    finally:
        if cgroup:
            os.rmdir(cgroup)
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {"error": tail, "cgroup_peak_bytes": used}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if used is not None:
        result["cgroup_peak_bytes"] = used  # the process and the page cache it filled
    return result


def main(argv):
    del argv
    if FLAGS._child:
        run = {"ours": _child_ours, "accelerate": _child_accelerate}[FLAGS._child]
        result = run(FLAGS._batch)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result))
        return
    if FLAGS.new_tokens < 3:
        raise app.UsageError("--new_tokens must be at least 3")
    files = _weight_files(FLAGS.model)
    rate = disk_read_rate(files)
    print(f"disk sequential read rate (page cache dropped): {rate / 1e9:.2f} GB/s")
    rows = []
    for batch in map(int, FLAGS.batches):
        # Each process starts from the disk: with a cgroup too, as pages cached before it (charged
        # elsewhere) would serve its reads.
        cold = FLAGS.drop_page_cache or FLAGS.cgroup_memory
        _drop(files) if cold else None
        row = {"batch": batch, "ours": _run_child("ours", batch)}
        if FLAGS.accelerate:
            _drop(files) if cold else None
            row["accelerate"] = _run_child("accelerate", batch)
        ours = row["ours"]
        if "error" not in ours:
            ours["tokens_per_second"] = batch * FLAGS.new_tokens / ours["seconds"]
            ours["decode_tokens_per_second"] = batch / ours["step_seconds"]
            ours["disk_bound_step_seconds"] = ours["bytes_per_step"] / rate
            bound = ours["disk_bound_step_seconds"]  # 0 when every layer stays resident
            ours["step_over_disk_bound"] = ours["step_seconds"] / bound if bound else None
        theirs = row.get("accelerate", {})
        if theirs and "error" not in theirs:
            theirs["tokens_per_second"] = batch * FLAGS.new_tokens / theirs["seconds"]
            theirs["decode_tokens_per_second"] = batch / theirs["step_seconds"]
            if "error" not in ours:
                row["speedup"] = ours["tokens_per_second"] / theirs["tokens_per_second"]
        rows.append(row)
        print(json.dumps(row))
    result = {
        "model": os.path.basename(os.path.normpath(FLAGS.model)),
        "memory_limit": FLAGS.memory_limit,
        "new_tokens": FLAGS.new_tokens,
        "prompt_len": FLAGS.prompt_len,
        "drop_page_cache": FLAGS.drop_page_cache,
        "cgroup_memory": FLAGS.cgroup_memory,
        "disk_read_bytes_per_second": rate,
        "cpu": _cpu(),
        "rows": rows,
    }
    if FLAGS.output:
        os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
        with open(FLAGS.output, "w") as f:
            json.dump(result, f, indent=2)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        name = "unknown"
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    app.run(main)
