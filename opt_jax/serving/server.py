"""An OpenAI-compatible completions API over the engine (FastAPI; `opt_jax[serve]`).

Endpoints: `GET /health` (200 once the model is loaded and compiled), `GET /v1/models`,
`POST /v1/completions` with the API's fields: model, prompt (a string, strings, a token list or
token lists), max_tokens (16), temperature (1; 0 = greedy), top_p, n, stop (up to 4 strings,
cut from the text), logprobs (top-k per token, k <= 5), echo (the prompt too, with its
log-probabilities when logprobs is set), stream (server-sent events ending `data: [DONE]`),
seed, presence_penalty, frequency_penalty. Errors are OpenAI-style bodies naming the field:
400 for invalid requests (a prompt longer than the context included: nothing is truncated),
404 for another model name, 429 when the waiting queue is full.

Text prompts get OPT's `</s>` prefix (the tokenizer contract); token prompts are used as
given. Log-probabilities are the model's (before temperature / top-p), as OpenAI reports.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from opt_jax.serving.engine import TOP_LOGPROBS, QueueFull, Request
from opt_jax.tokenizer import IncrementalDecoder, OPTTokenizer

FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "logprobs", "echo",
    "stream", "seed", "presence_penalty", "frequency_penalty", "user", "best_of", "suffix",
    "logit_bias", "stream_options",
}  # fmt: skip


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code=None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def _error(message: str, param=None, status=400, kind="invalid_request_error", code=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _number(body, name, default, low, high, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{name}' must be {kind} in [{low}, {high}], got {value!r}", name)
    return value


def parse(body, tokenizer, engine, model_name: str) -> dict:
    """Validates a completions request body.

    Returns:
      the options, with `prompts`: [(prompt text for echo, token ids)].

    Raises:
      BadRequest: naming the field.
    """
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}", unknown[0])
    model = body.get("model")
    if model not in (None, "", model_name):
        raise BadRequest(f"model {model!r} is not served here (this server has "
                         f"{model_name!r})", "model", 404, "model_not_found")  # fmt: skip
    for name in ("best_of", "suffix", "logit_bias"):
        if body.get(name) not in (None, 1, {}):
            raise BadRequest(f"'{name}' is not supported", name)
    encoded = _prompts(body.get("prompt"), tokenizer, engine.config.vocab_size)
    stop = _stop(body.get("stop"))
    options = {
        "prompts": encoded,
        "max_tokens": _number(body, "max_tokens", 16, 0, engine.max_length, integer=True),
        "temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        "top_p": float(_number(body, "top_p", 1.0, 0.0, 1.0)),
        "n": _number(body, "n", 1, 1, engine.max_batch, integer=True),
        "logprobs": _number(body, "logprobs", None, 0, TOP_LOGPROBS, integer=True),
        "presence_penalty": float(_number(body, "presence_penalty", 0.0, -2.0, 2.0)),
        "frequency_penalty": float(_number(body, "frequency_penalty", 0.0, -2.0, 2.0)),
        "seed": body.get("seed"),
        "stop": stop,
        "echo": bool(body.get("echo", False)),
        "stream": bool(body.get("stream", False)),
    }
    if options["top_p"] <= 0:
        raise BadRequest("'top_p' must be in (0, 1]", "top_p")
    seed = options["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"'seed' must be an integer, got {seed!r}", "seed")
    if options["max_tokens"] == 0 and not options["echo"]:
        raise BadRequest("'max_tokens' must be >= 1 (0 only with echo)", "max_tokens")
    for _, ids in encoded:
        problem = engine.check(len(ids), options["max_tokens"], options["n"])
        if problem:
            raise BadRequest(*problem)
    return options


def _is_ids(p) -> bool:
    """Whether p is a non-empty list of token ids (ints, not bools)."""
    ints = (
        (isinstance(t, int) and not isinstance(t, bool) for t in p) if isinstance(p, list) else ()
    )
    return isinstance(p, list) and bool(p) and all(ints)


def _prompts(prompt, tokenizer, vocab: int) -> list[tuple[str, list[int]]]:
    """The request's prompts as [(text, token ids)]: a string, strings, a token list or token
    lists (token ids in [0, vocab); their text is what the ids decode to, for echo)."""

    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise BadRequest(
            "'prompt' must be a non-empty string, list of strings, token list or list of "
            "token lists",
            "prompt",
        )
    encoded = []
    for p in prompts:
        if isinstance(p, str):
            encoded.append((p, tokenizer.encode(p)))
            continue
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"'prompt' token ids {bad[:5]} are outside [0, {vocab})", "prompt")
        encoded.append((tokenizer.decode(p, skip_special_tokens=False), list(p)))
    return encoded


def _stop(stop) -> list[str]:
    """`stop`: None, a string, or a list of up to 4 non-empty strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return stop


class Choice:
    """Host-side state of one choice: tokens so far, their log-probabilities, the text sent."""

    def __init__(self, index: int, prompt_text: str, tokenizer: OPTTokenizer):
        self.index, self.prompt_text = index, prompt_text
        self.ids, self.logprobs, self.tops = [], [], []
        self.prompt_logprobs = None
        self.finish = None
        self.decoder = IncrementalDecoder(tokenizer)  # the text of ids, as it completes
        self.text = ""  # decoder.text cut at the first stop string
        self.sent = 0  # characters of text already streamed


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def _logprobs_block(tokenizer, choice: Choice, k: int, echo: bool, prompt_ids) -> dict:
    tokens, token_logprobs, top_logprobs = [], [], []
    if echo:
        for i, t in enumerate(prompt_ids):
            tokens.append(_token_text(tokenizer, t))
            entry = choice.prompt_logprobs[i] if choice.prompt_logprobs else None
            token_logprobs.append(None if entry is None else entry[0])
            top_logprobs.append(
                None if entry is None
                else {_token_text(tokenizer, i_): lp for i_, lp in entry[1][:k]}
            )  # fmt: skip
    for t, lp, top in zip(choice.ids, choice.logprobs, choice.tops, strict=True):
        tokens.append(_token_text(tokenizer, t))
        token_logprobs.append(lp)
        top_logprobs.append({_token_text(tokenizer, i): v for i, v in top[:k]})
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs, "text_offset": offsets}  # fmt: skip


class Completion:
    """One completions request in flight: its engine requests (one per prompt, n choices
    each), the choices' host-side state, and the engine events that reach them.

    The engine thread emits events; `emit` hands them to the asyncio loop's queue, and the
    request handler consumes them with `collect` (one response) or `stream` (server-sent
    events).
    """

    def __init__(self, options: dict, engine, tokenizer, model_name: str):
        self.options, self.tokenizer, self.n = options, tokenizer, options["n"]
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []
        self.requests: list[Request] = []
        seed = options["seed"]
        for p, (text, ids) in enumerate(options["prompts"]):
            for j in range(self.n):
                index = p * self.n + j
                self.choices.append(Choice(index, text if options["echo"] else "", tokenizer))
            self.requests.append(Request(
                prompt=ids, max_tokens=options["max_tokens"], emit=self._emitter(p),
                n=self.n, temperature=options["temperature"], top_p=options["top_p"],
                presence_penalty=options["presence_penalty"],
                frequency_penalty=options["frequency_penalty"],
                seed=int.from_bytes(uuid.uuid4().bytes[:4], "little") if seed is None else seed,
                echo_logprobs=options["echo"] and options["logprobs"] is not None,
                stop_ids=(engine.config.eos_token_id,),
            ))  # fmt: skip
        self.header = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                       "created": int(time.time()), "model": model_name}  # fmt: skip

    def _emitter(self, prompt: int):
        def emit(choice, event):  # called from the engine thread
            self.loop.call_soon_threadsafe(
                self.events.put_nowait, (prompt * self.n + choice, event)
            )

        return emit

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled = True

    # -- engine events -> choices ------------------------------------------------------------
    def update(self, index: int, event: dict) -> str | None:
        """Applies an engine event; returns an error message for a failed request."""
        choice = self.choices[index]
        if "error" in event:
            return event["error"]
        if "prompt_logprobs" in event:
            choice.prompt_logprobs = event["prompt_logprobs"]
        if "token" in event and choice.finish is None:
            choice.ids.append(event["token"])
            choice.logprobs.append(event["logprob"])
            choice.tops.append(event["top"])
            searched = len(choice.decoder.text)
            if choice.decoder.push(event["token"]):
                self._apply_stops(choice, searched)
        if "finish_reason" in event and choice.finish is None:
            searched = len(choice.decoder.text)
            choice.decoder.finish()  # an incomplete last character, as decode shows it
            self._apply_stops(choice, searched)
            if choice.finish is None:
                choice.finish = event["finish_reason"]
        return None

    def _apply_stops(self, choice: Choice, searched: int) -> None:
        """choice.text = the decoded text cut at its first stop string. Text before `searched`
        was searched already: only a stop string ending after it can be new."""
        text = choice.decoder.text
        cuts = [text.find(s, max(searched - len(s) + 1, 0)) for s in self.options["stop"]]
        cut = min((c for c in cuts if c >= 0), default=-1)
        choice.text = text if cut < 0 else text[:cut]
        if cut >= 0:
            choice.finish = "stop"
            self.requests[choice.index // self.n].stopped.add(choice.index % self.n)

    # -- one response ------------------------------------------------------------------------
    async def collect(self, http: HTTPRequest):
        """Waits for every choice; the response body (or an error response)."""
        try:
            while any(c.finish is None for c in self.choices):
                try:
                    index, event = await asyncio.wait_for(self.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        self.cancel()
                        return _error("client disconnected", status=499)
                    continue
                problem = self.update(index, event)
                if problem:
                    self.cancel()
                    return _error(problem, None, 500, "server_error")
        except asyncio.CancelledError:
            self.cancel()
            raise
        return {**self.header, "choices": [self._render(c) for c in self.choices],
                "usage": self._usage()}  # fmt: skip

    def _render(self, choice: Choice) -> dict:
        """A finished choice as the non-streaming response lists it."""
        options = self.options
        logprobs = None
        if options["logprobs"] is not None:
            prompt_ids = options["prompts"][choice.index // self.n][1]
            logprobs = _logprobs_block(
                self.tokenizer, choice, options["logprobs"], options["echo"], prompt_ids
            )
        return {"text": choice.prompt_text + choice.text, "index": choice.index,
                "logprobs": logprobs, "finish_reason": choice.finish}  # fmt: skip

    def _usage(self) -> dict:
        prompt_tokens = sum(len(ids) for _, ids in self.options["prompts"])
        completion = sum(len(c.ids) for c in self.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}  # fmt: skip

    # -- server-sent events ------------------------------------------------------------------
    async def stream(self):
        """The response as server-sent events, ending `data: [DONE]`."""
        try:
            if self.options["echo"]:  # the prompt first, as OpenAI streams echo
                for c in self.choices:
                    yield self._chunk(c.prompt_text, c.index, None, None)
            while any(c.finish is None or c.sent < len(c.text) for c in self.choices):
                index, event = await self.events.get()
                problem = self.update(index, event)
                if problem:
                    error = {"error": {"message": problem, "type": "server_error"}}
                    yield f"data: {json.dumps(error)}\n\n"
                    break
                chunk = self._delta(self.choices[index], event)
                if chunk is not None:
                    yield chunk
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we finished): free the slots either way
            self.cancel()

    def _delta(self, choice: Choice, event: dict) -> str | None:
        """The chunk an event makes, None when it adds nothing to send yet."""
        options = self.options
        # Hold back text that may still grow into a stop string (the decoder holds back
        # incomplete characters).
        hold = max((len(s) - 1 for s in options["stop"]), default=0)
        ready = len(choice.text) if choice.finish else max(len(choice.text) - hold, 0)
        delta = choice.text[choice.sent : ready]
        with_token = options["logprobs"] is not None and "token" in event
        if not delta and choice.finish is None and not with_token:
            return None  # (with logprobs every token gets its chunk)
        choice.sent = max(choice.sent, ready)
        logprobs = None
        if with_token:
            top = event["top"][: options["logprobs"]]
            text = functools.partial(_token_text, self.tokenizer)
            logprobs = {
                "tokens": [text(event["token"])],
                "token_logprobs": [event["logprob"]],
                "top_logprobs": [{text(i): v for i, v in top}],
            }
        return self._chunk(delta, choice.index, logprobs, choice.finish)

    def _chunk(self, text: str, index: int, logprobs, finish) -> str:
        chunk = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
        return f"data: {json.dumps({**self.header, 'choices': [chunk]})}\n\n"


def create_app(engine, tokenizer, model_name: str):
    """The FastAPI application serving `engine` (already started and warmed up)."""
    app = FastAPI(title="opt_jax", version="1")
    created = int(time.time())

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "opt_jax"}
        ]}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        try:
            body = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error("the request body is not valid JSON")
        try:
            options = parse(body, tokenizer, engine, model_name)
        except BadRequest as e:
            return _error(str(e), e.param, e.status, "invalid_request_error", e.code)
        completion = Completion(options, engine, tokenizer, model_name)
        try:
            for request in completion.requests:
                engine.submit(request)
        except QueueFull as e:
            completion.cancel()
            return _error(f"the server is busy: {e}; retry later", None, 429,
                          "rate_limit_error", "rate_limit_exceeded")  # fmt: skip
        except ValueError as e:
            completion.cancel()
            return _error(str(e), "prompt")
        if not options["stream"]:
            return await completion.collect(http)
        return StreamingResponse(completion.stream(), media_type="text/event-stream")

    return app
