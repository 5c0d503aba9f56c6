"""The OpenAI-compatible server (scripts/serve.py) driven by the `openai` client: results equal
`generate` for the same request alone, streaming, n > 1, stop strings, echo + logprobs equal
`loglikelihood`, bad requests, a full queue, a client that leaves, SIGTERM draining."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import opt_jax

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta red blue green good bad movie plot actor what is the".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_dir(directory: Path, max_positions: int) -> Path:
    config = opt_jax.OPTConfig(vocab_size=304, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                               num_attention_heads=4, max_position_embeddings=max_positions,
                               init_std=0.3, dropout=0.0)  # fmt: skip
    params = opt_jax.init_params(config, 0)
    opt_jax.save_pretrained(directory, config, params)
    opt_jax.train_tokenizer([" ".join(WORDS)] * 50, 300).save(directory)
    return directory


class Server:
    def __init__(self, model_dir: Path, *flags: str):
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", str(model_dir),
             "--port", str(self.port), *flags],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError("the server did not become healthy in 180 s")

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = _model_dir(tmp_path_factory.mktemp("serve_model"), 256)
    server = Server(model_dir, "--max_batch", "4", "--max_length", "256")
    config, params = opt_jax.load_pretrained(model_dir)
    yield server, model_dir, config, params, opt_jax.OPTTokenizer.from_pretrained(model_dir)
    server.close()


def _client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _alone(config, params, ids, n_new, **options):
    out = opt_jax.generate(opt_jax.OPTForCausalLM(config), params, np.array([ids]),
                           max_new_tokens=n_new, **options)  # fmt: skip
    return out.sequences[0, len(ids) :].tolist()


def test_health_and_models(served):
    server, model_dir = served[:2]
    models = _client(server).models.list()
    assert [m.id for m in models.data] == [model_dir.name]


def test_concurrent_greedy_requests_each_equal_generate_alone(served):
    """Text and token prompts sent at once (continuous batching): token-identical to
    `generate` on each prompt alone, text = decode(tokens), usage counted."""
    server, model_dir, config, params, tokenizer = served
    client = _client(server)
    prompts = ["alpha beta", "gamma delta red blue green", [2, 17, 40, 41], "what is the movie"]
    results = [None] * len(prompts)

    def ask(i):
        results[i] = client.completions.create(model=model_dir.name, prompt=prompts[i],
                                               max_tokens=12, temperature=0)  # fmt: skip

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for prompt, result in zip(prompts, results, strict=True):
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        want = _alone(config, params, ids, 12, eos_token_id=[])
        (choice,) = result.choices
        stop = want.index(2) + 1 if 2 in want else len(want)  # EOS ends a choice
        assert choice.text == tokenizer.decode(want[:stop])
        assert choice.finish_reason == ("stop" if 2 in want else "length")
        assert result.usage.prompt_tokens == len(ids)
        assert result.usage.completion_tokens == stop


def test_seeded_sampling_n2_and_streaming_equal_generate(served):
    server, model_dir, config, params, tokenizer = served
    client = _client(server)
    args = dict(model=model_dir.name, prompt="alpha beta gamma", max_tokens=10, n=2, seed=11,
                temperature=0.9, top_p=0.95, logprobs=2)  # fmt: skip
    full = client.completions.create(**args)
    ids = tokenizer.encode(args["prompt"])
    for choice in full.choices:
        key = jax.random.fold_in(jax.random.key(11), choice.index)
        want = _alone(config, params, ids, 10, eos_token_id=[], do_sample=True,
                      temperature=0.9, top_p=0.95, top_k=None, prng_key=key)  # fmt: skip
        stop = want.index(2) + 1 if 2 in want else len(want)
        assert choice.text == tokenizer.decode(want[:stop])
        assert len(choice.logprobs.token_logprobs) == stop
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    streamed = {0: "", 1: ""}
    finish = {}
    for chunk in client.completions.create(**args, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert streamed == {c.index: c.text for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}


def test_stop_strings_cut_the_text(served):
    server, model_dir, config, params, tokenizer = served
    client = _client(server)
    ask = dict(model=model_dir.name, prompt="alpha", max_tokens=16, temperature=0)
    free = client.completions.create(**ask)
    text = free.choices[0].text
    stop = text[3:6]
    assert stop and stop in text
    cut = client.completions.create(**ask, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(**ask, stop=stop, stream=True)
    )
    assert streamed == cut.choices[0].text


def test_echo_logprobs_equal_loglikelihood(served):
    """What lm-eval's local-completions backend asks: echo the prompt with its log-probs."""
    server, model_dir, config, params, tokenizer = served
    context, continuation = "alpha beta", " gamma delta"
    result = _client(server).completions.create(
        model=model_dir.name,
        prompt=context + continuation,
        max_tokens=0,
        echo=True,
        logprobs=1,
        temperature=0,
    )
    choice = result.choices[0]
    assert choice.text == context + continuation
    lps = choice.logprobs.token_logprobs
    assert lps[0] is None  # the `</s>` prefix has no context
    from opt_jax.evaluation import loglikelihood

    ((want, _),) = loglikelihood(
        opt_jax.OPTForCausalLM(config), params, tokenizer, [(context, continuation)]
    )
    n = len(tokenizer.encode(context + continuation)) - len(tokenizer.encode(context))
    assert sum(lps[-n:]) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize(
    "request_args, status, field",
    [
        ({"prompt": "alpha", "temperature": 5}, 400, "temperature"),
        ({"prompt": "alpha", "n": 99}, 400, "n"),
        ({"prompt": "alpha " * 300}, 400, "prompt"),
        ({"prompt": "alpha", "max_tokens": 300}, 400, "max_tokens"),
        ({"prompt": "alpha", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": [5, 9999]}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": "alpha", "seed": "x"}, 400, "seed"),
        ({"prompt": "alpha", "logprobs": 9}, 400, "logprobs"),
        ({"prompt": "alpha", "bogus": 1}, 400, "bogus"),
        ({"prompt": "alpha", "model": "gpt-4"}, 404, "model"),
    ],
)  # fmt: skip
def test_bad_requests_name_the_field(served, request_args, status, field):
    import httpx

    server = served[0]
    response = httpx.post(server.url + "/v1/completions", json=request_args, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["message"]
    # ... and the server still answers
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "alpha", "max_tokens": 2})
    assert ok.status_code == 200


def test_full_queue_answers_429(served):
    """An engine that is not running keeps requests waiting: the second one finds the queue
    full."""
    from fastapi.testclient import TestClient

    from opt_jax.serving.engine import Engine, Request
    from opt_jax.serving.server import create_app

    _, _, config, params, tokenizer = served
    engine = Engine(config, params, max_batch=1, max_length=32, max_queue=1)
    engine.submit(Request([2, 5], 4, lambda c, e: None))  # fills the queue
    client = TestClient(create_app(engine, tokenizer, "tiny"))
    response = client.post("/v1/completions", json={"prompt": "alpha", "max_tokens": 2})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_client_that_leaves_frees_its_slot(served, monkeypatch):
    """One slot, the app under a real uvicorn: a streaming client that leaves after its first
    token must not hold the slot for its 200 tokens. The engine is held after each of the
    departed request's tokens until the server has cancelled it (an event, not a clock), so
    without the cancellation that request would run to its end and only then free the slot."""
    import httpx
    import uvicorn

    from opt_jax.serving.engine import Engine
    from opt_jax.serving.server import create_app

    _, model_dir, config, params, tokenizer = served
    engine = Engine(config, params, max_batch=1, max_length=256)
    submitted, events = [], []
    real_submit, real_decode = engine.submit, engine._decode

    def submit(request):  # records each request and the events the engine sends it
        log, emit = [], request.emit
        request.emit = lambda choice, event: (log.append(event), emit(choice, event))[1]
        submitted.append(request)
        events.append(log)
        real_submit(request)

    def held(*args):
        first = submitted[0]
        if engine.steps >= 1 and any(s is not None and s[0] is first for s in engine.slots):
            deadline = time.time() + 10  # then decode on (a server noticing only on write)
            while not first.cancelled and time.time() < deadline:
                time.sleep(0.005)
        return real_decode(*args)

    monkeypatch.setattr(engine, "submit", submit)
    monkeypatch.setattr(engine, "_decode", held)
    engine.start()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tokenizer, model_dir.name),
                                           host="127.0.0.1", port=_free_port(),
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)  # no signal handlers off main
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started and thread.is_alive() and time.time() < deadline:
            time.sleep(0.01)
        assert server.started
        url = f"http://127.0.0.1:{server.config.port}/v1/completions"
        # logprobs: a chunk for every token, so the first chunk is the first token
        body = {"prompt": "alpha", "max_tokens": 200, "temperature": 0, "stream": True,
                "logprobs": 0}  # fmt: skip
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))  # then leave
        short = httpx.post(url, timeout=60,
                           json={"prompt": "beta", "max_tokens": 3, "temperature": 0})  # fmt: skip
        assert short.status_code == 200, short.text
        departed = [e for e in events[0] if "token" in e]
        assert submitted[0].cancelled and 1 <= len(departed) < 200, len(departed)
        assert not any("finish_reason" in e for e in events[0])  # freed, never finished
        # The recycled slot serves the next request as generate does alone.
        ids = tokenizer.encode("beta")
        want = _alone(config, params, ids, 3, eos_token_id=[])
        stop = want.index(2) + 1 if 2 in want else len(want)
        assert short.json()["choices"][0]["text"] == tokenizer.decode(want[:stop])
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.stop()


def test_sigterm_drains_the_request_in_flight(served):
    """SIGTERM once a streamed completion has sent its first token: the request still gets
    all its 200 tokens and [DONE], then the process exits with the signal's status."""
    import httpx

    model_dir = served[1]
    server = Server(model_dir, "--max_batch", "1", "--max_length", "256")
    try:
        body = {"prompt": "beta", "max_tokens": 200, "temperature": 0, "stream": True,
                "logprobs": 0}  # fmt: skip
        chunks, done = [], False
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                if not chunks:  # the first token is out: the request is in flight
                    server.proc.send_signal(signal.SIGTERM)
                chunks.append(json.loads(line[len("data: ") :])["choices"][0])
        assert done
        # greedy "beta" runs its 200 tokens without `</s>` (a sampled request could stop at
        # `</s>` at any time)
        assert sum(len(c["logprobs"]["tokens"]) for c in chunks if c["logprobs"]) == 200
        assert chunks[-1]["finish_reason"] == "length"
        # uvicorn re-raises the signal once it has drained, so the exit is the signal's
        assert server.proc.wait(timeout=120) in (0, -signal.SIGTERM)
    finally:
        server.close()


def test_lm_eval_local_completions_against_the_server_matches_our_backend(served, monkeypatch):
    """lm-eval's `local-completions` model (the OpenAI API with echo + logprobs) on the server
    gives our in-process backend's per-request log-likelihoods and metrics."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import opt_jax.eval_harness  # noqa: F401

    server, model_dir = served[:2]
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data relative to the repository
    manager = TaskManager(include_path=str(ROOT / "tests" / "eval_tasks"))
    remote = (f"model={model_dir.name},base_url={server.url}/v1/completions,"
              f"tokenizer_backend=huggingface,tokenizer={model_dir},num_concurrent=2,"
              "max_retries=1,tokenized_requests=True,add_bos_token=True")  # fmt: skip
    runs = {
        name: lm_eval.simple_evaluate(model=name, model_args=args, tasks=["opt_jax_mc"],
                                      task_manager=manager, limit=8, log_samples=True)
        for name, args in (("local-completions", remote),
                           ("opt_jax", f"pretrained={model_dir},batch_size=8"))
    }  # fmt: skip
    a, b = (
        [float(x) for s in r["samples"]["opt_jax_mc"] for pair in s["filtered_resps"]
         for x in pair]
        for r in (runs["local-completions"], runs["opt_jax"])
    )  # fmt: skip
    assert len(a) == len(b) == 8 * 4 * 2
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert runs["local-completions"]["results"]["opt_jax_mc"][metric] == pytest.approx(
            runs["opt_jax"]["results"]["opt_jax_mc"][metric]
        )


def test_a_failing_request_does_not_stop_the_engine(served, monkeypatch):
    """An exception while serving one request becomes that request's error; the next request
    is served normally."""
    from opt_jax.serving.engine import Engine, Request

    _, _, config, params, _ = served
    engine = Engine(config, params, max_batch=2, max_length=64)
    engine.start()
    try:
        real, calls = engine._prefill, []

        def flaky(*args):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected failure")
            return real(*args)

        monkeypatch.setattr(engine, "_prefill", flaky)
        events = {0: [], 1: []}
        finished = [threading.Event(), threading.Event()]

        def emitter(k):
            def emit(choice, event):
                events[k].append(event)
                if "error" in event or "finish_reason" in event:
                    finished[k].set()

            return emit

        engine.submit(Request([2, 5, 9], 4, emitter(0), temperature=0.0))
        assert finished[0].wait(60) and "injected failure" in events[0][-1]["error"]
        engine.submit(Request([2, 5, 9], 4, emitter(1), temperature=0.0))
        assert finished[1].wait(60) and events[1][-1] == {"finish_reason": "length"}
        assert [e["token"] for e in events[1] if "token" in e] == _alone(
            config, params, [2, 5, 9], 4, eos_token_id=[]
        )
    finally:
        engine.stop()


def test_engine_with_quantized_scanned_weights_equals_generate(served):
    """`serve.py --quantize` loads int8 weights with scan_layers (a stacked KV cache): greedy
    results still equal generate's on the same parameters."""
    from opt_jax.serving.engine import Engine, Request

    model_dir = served[1]
    config, params = opt_jax.load_pretrained(model_dir, quantize="int8", scan_layers=True)
    engine = Engine(config, params, max_batch=2, max_length=64)
    engine.start()
    try:
        results = {0: [], 1: []}
        done = [threading.Event(), threading.Event()]
        prompts = [[2, 5, 9, 14], [2, 40, 41]]
        for k, prompt in enumerate(prompts):

            def emit(choice, event, k=k):
                results[k].append(event)
                if "finish_reason" in event or "error" in event:
                    done[k].set()

            engine.submit(Request(prompt, 6, emit, temperature=0.0, stop_ids=()))
        for k, prompt in enumerate(prompts):
            assert done[k].wait(120), results[k]
            tokens = [e["token"] for e in results[k] if "token" in e]
            assert tokens == _alone(config, params, prompt, 6, eos_token_id=[])
    finally:
        engine.stop()


def test_a_prompt_near_the_context_limit_leaves_room_for_its_completion(served):
    """20 prompt tokens + 12 new in a 32-slot context: the prompt's padded bucket (32) would
    fill the cache; the engine pads less, and the tokens equal generate's."""
    from opt_jax.serving.engine import Engine, Request

    _, _, config, params, _ = served
    engine = Engine(config, params, max_batch=2, max_length=32)
    engine.start()
    try:
        events, done = [], threading.Event()
        prompt = [2] + list(range(5, 24))

        def emit(choice, event):
            events.append(event)
            if "finish_reason" in event or "error" in event:
                done.set()

        engine.submit(Request(prompt, 12, emit, temperature=0.0, stop_ids=()))
        assert done.wait(120), events
        tokens = [e["token"] for e in events if "token" in e]
        assert tokens == _alone(config, params, prompt, 12, eos_token_id=[])
    finally:
        engine.stop()
