"""Load test of scripts/serve.py against its peers, measured in one run.

  python scripts/random_checkpoint.py --preset 125m --out /tmp/opt-125m-random
  python scripts/benchmark_serve.py --model /tmp/opt-125m-random --clients 32 --tokens 64

Starts the server (--max_batch = --clients), then times the same completion requests (prompts
of ~32 tokens, --tokens new tokens each, greedy, EOS ignored by asking for what the model
emits) three ways: all --clients at once (streaming, so time to first token is seen), one at a
time to our server, and one at a time through transformers' (PyTorch) `generate`. Prints
aggregate tokens/s, the ratios, p50/p95 latency and time to first token, and the CPU it ran on;
--output writes them as JSON.
"""

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

from absl import app, flags

flags.DEFINE_string("model", None, "HF directory with a tokenizer.", required=True)
flags.DEFINE_integer("clients", 32, "Concurrent clients (and the server's max_batch).")
flags.DEFINE_integer("tokens", 64, "New tokens per request.")
flags.DEFINE_integer("sequential", 4, "Requests timed one at a time (ours and HF).")
flags.DEFINE_string("output", None, "Write the results as JSON here.")

PROMPT = 'def read_config(path, defaults=None):\n    """Read a configuration file and'


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, tokens: int, stream: bool):
    """(seconds, time to first token, completion tokens) of one completion."""
    import httpx

    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": stream,
            "logprobs": 0}  # fmt: skip
    start = time.perf_counter()
    first, count = None, 0
    if stream:
        with httpx.stream("POST", url, json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    if first is None:
                        first = time.perf_counter() - start
                    for choice in json.loads(line[6:])["choices"]:
                        count += len((choice["logprobs"] or {}).get("tokens", []))
    else:
        r = httpx.post(url, json=body, timeout=600)
        r.raise_for_status()
        count = r.json()["usage"]["completion_tokens"]
    return time.perf_counter() - start, first, count


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv):
    del argv
    import httpx

    f = flags.FLAGS
    port = _port()
    server = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "serve.py"), "--model", f.model,
         "--port", str(port), "--max_batch", str(f.clients), "--max_length", "256"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    started = time.time()
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() - started > 600:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        endpoint = url + "/v1/completions"
        _request(endpoint, f.tokens, False)  # warm: the prompt's shapes compile once
        sequential = [_request(endpoint, f.tokens, False) for _ in range(f.sequential)]
        results = [None] * f.clients

        def client(i):
            results[i] = _request(endpoint, f.tokens, True)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(f.clients)]
        wall = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        wall = time.perf_counter() - wall
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)

    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.OPTForCausalLM.from_pretrained(f.model).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(f.model)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    hf_times = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm
        for _ in range(f.sequential):
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=f.tokens, min_new_tokens=f.tokens,
                                 do_sample=False)  # fmt: skip
            hf_times.append(time.perf_counter() - start)
            assert out.shape[1] - ids.shape[1] == f.tokens

    concurrent_tokens = sum(r[2] for r in results)
    rates = {
        "concurrent": concurrent_tokens / wall,
        "sequential": sum(r[2] for r in sequential) / sum(r[0] for r in sequential),
        "hf_sequential": f.tokens * len(hf_times) / sum(hf_times),
    }
    from opt_jax.planning import roofline

    report = {
        "cpu": roofline.describe_cpu(),
        "clients": f.clients,
        "tokens_per_request": f.tokens,
        "tokens_per_s": rates,
        "concurrent_vs_sequential": rates["concurrent"] / rates["sequential"],
        "concurrent_vs_hf": rates["concurrent"] / rates["hf_sequential"],
        "latency_s": {"p50": statistics.median(r[0] for r in results),
                      "p95": _percentile([r[0] for r in results], 0.95)},
        "ttft_s": {"p50": statistics.median(r[1] for r in results),
                   "p95": _percentile([r[1] for r in results], 0.95)},
        "sequential_latency_s": statistics.median(r[0] for r in sequential),
    }  # fmt: skip
    print(f"CPU: {report['cpu']}")
    print("| workload | tokens/s | ratio |")
    print("|---|---|---|")
    print(f"| {f.clients} concurrent clients, ours | {rates['concurrent']:.1f} | 1.00x |")
    print(f"| one at a time, ours | {rates['sequential']:.1f} | "
          f"{rates['concurrent'] / rates['sequential']:.2f}x less |")  # fmt: skip
    print(f"| one at a time, transformers generate | {rates['hf_sequential']:.1f} | "
          f"{rates['concurrent'] / rates['hf_sequential']:.2f}x less |")  # fmt: skip
    print(f"latency p50 {report['latency_s']['p50']:.2f} s, p95 {report['latency_s']['p95']:.2f}"
          f" s; time to first token p50 {report['ttft_s']['p50']:.2f} s, p95 "
          f"{report['ttft_s']['p95']:.2f} s; one request alone {report['sequential_latency_s']:.2f}"
          " s")  # fmt: skip
    if f.output:
        with open(f.output, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    app.run(main)
