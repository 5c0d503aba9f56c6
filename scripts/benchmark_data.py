"""Token stores against Hugging Face `datasets`, and what training reads from them, in one run.

  python scripts/benchmark_data.py --tokenizer demo_out/data/tokenizer \
      --workdir /tmp/benchmark_data --output experiments/data/results.json

1. Throughput: scripts/prepare_data.py with 2 workers against `datasets`' load_dataset("json")
   + map(batched=True, num_proc=2) with the same `tokenizers` tokenizer, on the same
   --gigabytes of JSON lines (written from the standard library's sources), each timed from
   its command's start to its end (process start-up, reading, tokenizing and writing included).
2. Memory of the build: the peak resident memory of prepare_data.py's whole process tree
   (sampled every 50 ms from /proc) on --small_gigabytes and --large_gigabytes of text.
3. Memory of training's reader: a process that opens a Mixture over the large store and reads
   --batches batches of --batch x --seq_len: its resident memory before and after, anonymous
   (what it holds) and file-backed (the store's mapped pages, the OS page cache) apart.
4. Loader speed: batches per second of that reader against the batches per second a 125m
   training step consumes at the same shape (one timed step after compilation).
"""

import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("tokenizer", None, "Tokenizer directory for both tokenizers.", required=True)
flags.DEFINE_string("workdir", None, "Scratch directory (corpora and stores).", required=True)
flags.DEFINE_float("gigabytes", 1.0, "JSON lines for the throughput comparison.")
flags.DEFINE_float("small_gigabytes", 0.25, "Text for the smaller memory measurement.")
flags.DEFINE_float("large_gigabytes", 2.0, "Text for the larger one (and the reader).")
flags.DEFINE_integer("batch", 2, "Rows per batch (reader and the 125m step).")
flags.DEFINE_integer("seq_len", 2048, "Tokens per row.")
flags.DEFINE_integer("batches", 500, "Batches the reader reads.")
flags.DEFINE_bool("skip_train_step", False, "Skip timing the 125m training step.")
flags.DEFINE_string("output", None, "Write the results as JSON here.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = 8  # the corpus is split into this many .jsonl files


def make_corpus(directory: str, gigabytes: float) -> list[str]:
    """JSON lines of standard-library sources (cycled, numbered) until `gigabytes` is written."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"part-{i}.jsonl") for i in range(FILES)]
    if all(os.path.exists(p) for p in paths):
        return paths
    stdlib = sysconfig.get_paths()["stdlib"]
    texts = []
    for base, _, names in os.walk(stdlib):
        texts += [os.path.join(base, n) for n in sorted(names) if n.endswith(".py")]
    target, written, i = int(gigabytes * 1e9), 0, 0
    files = [open(p, "w") for p in paths]
    try:
        while written < target:
            with open(texts[i % len(texts)], encoding="utf-8", errors="replace") as f:
                line = json.dumps({"text": f"# copy {i}\n" + f.read()}) + "\n"
            files[i % FILES].write(line)
            written += len(line)
            i += 1
    finally:
        for f in files:
            f.close()
    return paths


def peak_tree_rss(proc: subprocess.Popen) -> tuple[int, float]:
    """(peak summed RSS bytes of the process and its children, seconds) until it exits."""

    def tree(pid):
        out = [pid]
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                for child in f.read().split():
                    out += tree(int(child))
        except OSError:
            pass
        return out

    def rss(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    start, peak = time.perf_counter(), 0
    while proc.poll() is None:
        peak = max(peak, sum(rss(p) for p in tree(proc.pid)))
        time.sleep(0.05)
    if proc.returncode:
        raise RuntimeError(f"{proc.args} failed with {proc.returncode}")
    return peak, time.perf_counter() - start


def prepare(paths, tokenizer, out, workers=2) -> tuple[int, float]:
    command = [sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"),
               "--source", ",".join(paths), "--tokenizer", tokenizer, "--out", out,
               "--workers", str(workers)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    return peak_tree_rss(proc)


HF_MAP = """
import sys, time
import datasets, numpy as np, tokenizers
files, tokenizer_file, cache = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
tok = tokenizers.Tokenizer.from_file(tokenizer_file)
def encode(batch):
    return {"ids": [[2] + e.ids for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}
ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache)
out = ds.map(encode, batched=True, num_proc=2, remove_columns=["text"])
print(sum(len(x) for x in out["ids"]))
"""


def hf_datasets(paths, tokenizer, cache) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", HF_MAP, ",".join(paths), os.path.join(tokenizer, "tokenizer.json"),
         cache], capture_output=True, text=True,
        env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - start, int(proc.stdout.split()[-1])


READER = """
import json, sys, time
def memory():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out
import numpy as np
import opt_jax
before = memory()
store, batch, seq_len, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
mix = opt_jax.data.Mixture([(store, 1.0)], seq_len=seq_len, global_batch=batch, seed=0)
times = []
for step in range(batches):
    start = time.perf_counter()
    ids = mix.batch(step)["input_ids"]
    times.append(time.perf_counter() - start)
after = memory()
print(json.dumps({"before": before, "after": after, "seconds": times}))
"""


def reader(store, batch, seq_len, batches) -> dict:
    proc = subprocess.run([sys.executable, "-c", READER, store, str(batch), str(seq_len),
                           str(batches)], capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.splitlines()[-1])


def train_step_seconds(batch: int, seq_len: int) -> float:
    """One 125m training step at [batch, seq_len], timed after compiling it."""
    import jax
    import jax.numpy as jnp

    import opt_jax
    from opt_jax.training import step as train
    from opt_jax.training.experiment import base_config

    config = opt_jax.preset("125m")
    model = opt_jax.OPTForCausalLM(config)
    optim = base_config().optim
    tx = train.make_optimizer(optim, 1000)
    state = train.fresh_state(opt_jax.init_params(config, 0), tx)
    step = jax.jit(lambda s, b, r: train.train_step(s, b, r, model=model, tx=tx, optim=optim),
                   donate_argnums=(0,))  # fmt: skip
    ids = jnp.full((batch, seq_len), 5, jnp.int32)
    data = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    state, metrics = step(state, data, jax.random.key(0))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    state, metrics = step(state, data, jax.random.key(1))
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


def main(argv):
    del argv
    from opt_jax.planning import roofline

    f = flags.FLAGS
    os.makedirs(f.workdir, exist_ok=True)
    results = {"cpu": roofline.describe_cpu()}
    work = lambda name: os.path.join(f.workdir, name)  # noqa: E731

    # 1. Throughput
    corpus = make_corpus(work(f"corpus_{f.gigabytes}"), f.gigabytes)
    size = sum(os.path.getsize(p) for p in corpus)
    ours_store = work("store_throughput")
    subprocess.run(["rm", "-rf", ours_store], check=True)
    _, ours_s = prepare(corpus, f.tokenizer, ours_store)
    with tempfile.TemporaryDirectory(dir=f.workdir) as cache:
        hf_s, hf_tokens = hf_datasets(corpus, f.tokenizer, cache)
    ours_tokens = json.load(open(os.path.join(ours_store, "manifest.json")))["num_tokens"]
    results["throughput"] = {
        "bytes": size, "ours_seconds": ours_s, "datasets_seconds": hf_s,
        "ours_mb_per_s": size / ours_s / 1e6, "datasets_mb_per_s": size / hf_s / 1e6,
        "speedup": hf_s / ours_s, "tokens_equal": ours_tokens == hf_tokens,
    }  # fmt: skip
    print(f"[benchmark_data] throughput: {results['throughput']}", flush=True)

    # 2. Memory of the build, small and large corpus
    memory = {}
    for name, gigabytes in (("small", f.small_gigabytes), ("large", f.large_gigabytes)):
        paths = make_corpus(work(f"corpus_{gigabytes}"), gigabytes)
        out = work(f"store_{name}")
        subprocess.run(["rm", "-rf", out], check=True)
        peak, seconds = prepare(paths, f.tokenizer, out)
        memory[name] = {"bytes": sum(os.path.getsize(p) for p in paths), "peak_rss": peak,
                        "seconds": seconds}  # fmt: skip
        print(f"[benchmark_data] build {name}: {memory[name]}", flush=True)
    memory["peak_ratio"] = memory["large"]["peak_rss"] / memory["small"]["peak_rss"]
    results["build_memory"] = memory

    # 3-4. The reader: memory and speed, against a 125m training step
    read = reader(work("store_large"), f.batch, f.seq_len, f.batches)
    per_batch = statistics.median(read["seconds"][10:])
    results["reader"] = {
        "batch": [f.batch, f.seq_len], "batches": f.batches,
        "anon_bytes_added": read["after"]["RssAnon"] - read["before"]["RssAnon"],
        "file_bytes_added": read["after"]["RssFile"] - read["before"]["RssFile"],
        "rss_before": read["before"]["VmRSS"], "rss_after": read["after"]["VmRSS"],
        "batches_per_s": 1 / per_batch,
    }  # fmt: skip
    if not f.skip_train_step:
        step_s = train_step_seconds(f.batch, f.seq_len)
        results["reader"]["train_step_seconds"] = step_s
        results["reader"]["ratio_to_training"] = step_s / per_batch
    print(json.dumps(results, indent=2))
    if f.output:
        with open(f.output, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    app.run(main)
