"""OpenAI-compatible HTTP server: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health``, ``/metrics``, ``/tokenize``, ``/detokenize`` (FastAPI over :class:`AsyncLLMEngine`).

What it promises under bad input (shared/RELIABILITY.md): every error is OpenAI-shaped,
``{"error": {"message", "type", "param", "code"}}``, with 400 for validation (never 422), 401
for a missing or wrong API key, 404 for an unknown model or route, 413 for a body over the cap,
503 with ``Retry-After`` when the queue is full or the engine is draining or dead, and 500
otherwise, never with a stack trace. A bad request is refused before anything is queued, and a
client that goes away (streaming or not) aborts its request, which frees its pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from jaxpage.engine.async_engine import AsyncLLMEngine, EngineDead, EngineUnavailable
from jaxpage.entrypoints.openai.protocol import (MAX_COMPLETION_LOGPROBS, MAX_MESSAGES,
                                                 MAX_PROMPTS, ChatCompletionRequest,
                                                 CompletionRequest, DetokenizeRequest,
                                                 TokenizeRequest, message_text)
from jaxpage.outputs import CompletionOutput, RequestOutput
from jaxpage.sampling_params import SamplingParams, param_error

logger = logging.getLogger("jaxpage")

MAX_BODY_BYTES = 8 * 2**20
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.1


@dataclass
class ServerConfig:
    """What the routes need besides the engine.

    Args:
        model_name: the name ``/v1/models`` lists and requests must use (or omit).
        max_model_len: the engine's context limit (reported by ``/tokenize``).
        tokenizer: HF-like tokenizer; None serves token-id prompts only.
        chat_template: Jinja chat template (None: the tokenizer's own).
        default_sampling: sampling fields a request leaves out (the model's generation config).
        api_key: required as ``Authorization: Bearer <key>`` on every route but ``/health``.
        max_body_bytes: larger bodies get 413.
        drain_timeout_s: at shutdown, how long requests in flight may take to finish.
    """

    model_name: str
    max_model_len: int
    tokenizer: Any = None
    chat_template: str | None = None
    default_sampling: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    drain_timeout_s: float = 30.0


# -- errors --------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, type_="service_unavailable_error", code=code,
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def _from_value_error(e: ValueError) -> APIError:
    code = getattr(e, "code", None)
    if code == "queue_full":
        return _unavailable(str(e), code)
    return APIError(400, str(e), param=getattr(e, "param", None), code=code or "invalid_value")


_STATUS_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                 413: "invalid_request_error"}


def _http_error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return APIError(status, message, type_=_STATUS_TYPES.get(status, "invalid_request_error"),
                    code=code).response()


# -- middleware (pure ASGI: they see every route, unknown ones included) --------------------------
def body_limit_middleware(app: Callable, max_bytes: int) -> Callable:
    """413 for a body over ``max_bytes``: by its Content-Length, or counted as it arrives."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        too_large = _http_error(413, f"the request body exceeds {max_bytes} bytes.",
                                "request_too_large")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            return await too_large(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:  # FastAPI passes an HTTPException through its parser
                    raise HTTPException(413, f"the request body exceeds {max_bytes} bytes.")
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, counted_receive, tracked_send)
        except HTTPException as e:  # raised outside a route (FastAPI renders it inside)
            if e.status_code != 413 or started:
                raise
            await too_large(scope, receive, send)

    return middleware


def api_key_middleware(app: Callable, api_key: str) -> Callable:
    """401 unless ``Authorization: Bearer <api_key>`` (constant-time compare); not on /health."""
    expected = f"Bearer {api_key}".encode()

    async def middleware(scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            got = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(got, expected):
                response = _http_error(401, "missing or invalid API key.", "invalid_api_key")
                return await response(scope, receive, send)
        return await app(scope, receive, send)

    return middleware


def count_middleware(app: Callable, serving: "_Serving", routes: set[str]) -> Callable:
    """Counts responses by route and status for ``/metrics`` (unknown paths as "other")."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        route = scope["path"] if scope["path"] in routes else "other"

        async def counted_send(message):
            if message["type"] == "http.response.start":
                serving.count(route, message["status"])
            await send(message)

        await app(scope, receive, counted_send)

    return middleware


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count) of seconds or token counts."""

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        name = f"jaxpage:{self.name}"
        out = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}",
                      f"{name}_count {self.count}"]


_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (1, 8, 32, 128, 512, 2048, 8192, 32768)


# -- the routes' shared work ---------------------------------------------------------------------
class _Serving:
    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.tokenizer = config.tokenizer
        self._token_text: dict[int, str] = {}
        self.num_requests: dict[str, int] = {}
        self.histograms = {
            "ttft": Histogram("time_to_first_token_seconds", "Arrival to first output token.",
                              _LATENCY_BUCKETS),
            "e2e": Histogram("e2e_request_latency_seconds", "Arrival to the last token of "
                             "finished requests.", _LATENCY_BUCKETS),
            "prompt": Histogram("request_prompt_tokens", "Prompt tokens per finished request.",
                                _TOKEN_BUCKETS),
            "generation": Histogram("request_generation_tokens", "Generated tokens per "
                                    "finished request (all n completions).", _TOKEN_BUCKETS)}

    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        if m is not None and m.first_token_time is not None:
            self.histograms["ttft"].observe(m.first_token_time - m.arrival_time)
        if m is not None and m.finished_time is not None:
            self.histograms["e2e"].observe(m.finished_time - m.arrival_time)
        self.histograms["prompt"].observe(len(out.prompt_token_ids))
        self.histograms["generation"].observe(sum(len(c.token_ids) for c in out.outputs))

    def admit(self, model: str | None) -> None:
        """503 while the engine takes no new requests; 404 for another model's name."""
        if not self.engine.accepting:
            raise _unavailable("the engine is " + ("draining" if self.engine.draining
                                                   else "down"), "engine_unavailable")
        if model is not None and model != self.config.model_name:
            raise APIError(404, f"The model {model!r} does not exist; this server serves "
                           f"{self.config.model_name!r}.", type_="not_found_error",
                           param="model", code="model_not_found")

    def need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise APIError(400, f"this model has no tokenizer: {what} needs one; send token ids.",
                           param="prompt")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not text:
            raise param_error("prompt", "must be a non-empty string.")
        tok = self.need_tokenizer("a text prompt")
        return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def chat_prompt(self, messages, add_generation_prompt: bool) -> tuple[str, list[int]]:
        if len(messages) > MAX_MESSAGES:
            raise param_error("messages", f"allows at most {MAX_MESSAGES} messages.")
        tok = self.need_tokenizer("a chat")
        conv = [{"role": m.role, "content": message_text(m)} for m in messages]
        try:
            text = tok.apply_chat_template(conv, tokenize=False,
                                           add_generation_prompt=add_generation_prompt,
                                           chat_template=self.config.chat_template)
        except Exception as e:  # a template's own raise_exception(), e.g. roles out of order
            raise param_error("messages", f"the chat template refused them: {e}") from None
        return text, list(tok(text, add_special_tokens=False)["input_ids"])

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = (self.tokenizer.decode([token_id]) if self.tokenizer is not None
                    else f"token_id:{token_id}")
            self._token_text[token_id] = text
        return text

    def count(self, route: str, status: int) -> None:
        key = f'route="{route}",status="{status}"'
        self.num_requests[key] = self.num_requests.get(key, 0) + 1

    async def run(self, request: Request, request_id: str, ids: list[int],
                  params: SamplingParams, prompt: str | None,
                  cache_salt: str | None) -> RequestOutput:
        """The request's final output; aborts it if the client disconnects first."""
        gen = self.stream(request_id, ids, params, prompt, cache_salt)

        async def last():
            out = None
            async for out in gen:
                pass
            return out

        task = asyncio.ensure_future(last())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected")  # nobody reads this response
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await gen.aclose()

    async def stream(self, request_id: str, ids: list[int], params: SamplingParams,
                     prompt: str | None, cache_salt: str | None) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self.engine.generate(request_id, ids, params, prompt=prompt,
                                                  cache_salt=cache_salt):
                if out.finished:
                    self.observe_finished(out)
                yield out
        except EngineUnavailable as e:
            raise _unavailable(str(e), "engine_unavailable") from None
        except EngineDead as e:
            raise APIError(500, str(e), type_="server_error", code="engine_dead") from None
        except ValueError as e:
            raise _from_value_error(e) from None


async def _all_or_none(coros: list) -> list:
    """Runs the coroutines together; the first failure cancels the others (their requests are
    aborted) and raises."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _check_finished(out: RequestOutput) -> None:
    if any(c.finish_reason == "error" for c in out.outputs):
        raise APIError(500, out.error or "internal error while generating", type_="server_error",
                       code="generation_failed")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(engine: AsyncLLMEngine, config: ServerConfig) -> "_Wrapped":
    """The ASGI app (FastAPI routes inside its middleware); the engine starts with the app's
    lifespan and drains at its shutdown."""
    serving = _Serving(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        await engine.shutdown(config.drain_timeout_s)  # SIGTERM: drain, then stop

    app = FastAPI(title="jaxpage", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "the body is not valid JSON.", code="invalid_json").response()
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        return APIError(400, f"{where}: {first.get('msg', 'invalid value')}", param=param,
                        code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def _http_exception(_req, e: HTTPException):
        message = {404: "no such route.", 405: "method not allowed."}.get(e.status_code,
                                                                        str(e.detail))
        return _http_error(e.status_code, message,
                           "request_too_large" if e.status_code == 413 else None)

    @app.exception_handler(ValueError)
    async def _value_error(_req, e: ValueError):
        return _from_value_error(e).response()

    @app.exception_handler(Exception)
    async def _internal(_req, e: Exception):
        logger.exception("request failed")
        return APIError(500, f"internal error ({type(e).__name__})", type_="server_error",
                        code="internal_error").response()

    # -- routes -------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine.accepting:
            return _unavailable("the engine is " + ("draining" if engine.draining else "down"),
                                "engine_unavailable").response()
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "jaxpage", "max_model_len": config.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(engine, serving),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        serving.admit(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise param_error("prompt", "give exactly one of 'prompt' and 'messages'.")
        if body.messages is not None:
            _, ids = serving.chat_prompt(body.messages, body.add_generation_prompt)
        else:
            ids = serving.encode(body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": config.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        serving.admit(body.model)
        tok = serving.need_tokenizer("detokenize")
        vocab = len(tok)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise param_error("tokens", f"contains {bad[0]}, outside the vocabulary [0, {vocab}).")
        return {"prompt": tok.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        serving.admit(body.model)
        if body.suffix:
            raise param_error("suffix", "is not supported.")
        if body.best_of is not None and body.best_of != body.n:
            raise param_error("best_of", "must equal n (or be omitted); best-of search is not "
                              "supported.")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise param_error("logprobs", f"must be in [0, {MAX_COMPLETION_LOGPROBS}], got "
                              f"{body.logprobs}.")
        if body.echo and body.logprobs is not None:
            raise param_error("echo", "with logprobs is not supported.")
        prompts = _completion_prompts(body.prompt, serving)
        params = body.sampling_params(max_tokens=body.max_tokens, logprobs=body.logprobs,
                                      defaults=config.default_sampling)
        for _, ids in prompts:  # every prompt checked before any is queued
            engine.engine.validate_request(ids, params, cache_salt=body.cache_salt)
        base = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _stream_response(_completion_chunks(serving, body, base, prompts, params))
        results = await _all_or_none([
            serving.run(request, f"{base}-{i}", ids, params, text, body.cache_salt)
            for i, (text, ids) in enumerate(prompts)])
        choices = []
        for i, (out, (text, _)) in enumerate(zip(results, prompts)):
            _check_finished(out)
            prefix = (text or "") if body.echo else ""
            for c in out.outputs:
                choices.append({"index": i * body.n + c.index, "text": prefix + c.text,
                                "logprobs": _completion_logprobs(serving, c, 0, 0),
                                "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason})
        return {"id": base, "object": "text_completion", "created": int(time.time()),
                "model": config.model_name, "choices": choices, "usage": _usage(list(results))}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        serving.admit(body.model)
        if body.tools:
            raise param_error("tools", "are not supported by this server.")
        if body.tool_choice not in (None, "none"):
            raise param_error("tool_choice", "is not supported by this server.")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise param_error("response_format", "only {'type': 'text'} is supported.")
        if body.top_logprobs is not None and not body.logprobs:
            raise param_error("top_logprobs", "needs logprobs: true.")
        text, ids = serving.chat_prompt(body.messages, body.add_generation_prompt)
        max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                      else body.max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(max_tokens=max_tokens, logprobs=logprobs,
                                      defaults=config.default_sampling)
        base = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            engine.engine.validate_request(ids, params, cache_salt=body.cache_salt)
            return _stream_response(_chat_chunks(serving, body, base, text, ids, params))
        out = await serving.run(request, base, ids, params, text, body.cache_salt)
        _check_finished(out)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(serving, c, 0) if body.logprobs else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                   for c in out.outputs]
        return {"id": base, "object": "chat.completion", "created": int(time.time()),
                "model": config.model_name, "choices": choices, "usage": _usage([out])}

    routes = {r.path for r in app.routes}
    asgi = body_limit_middleware(app, config.max_body_bytes)
    if config.api_key:
        asgi = api_key_middleware(asgi, config.api_key)
    return _Wrapped(count_middleware(asgi, serving, routes), serving)


def app_for_llm(llm, *, model_name: str, api_key: str | None = None,
                max_body_bytes: int = MAX_BODY_BYTES, drain_timeout_s: float = 30.0) -> "_Wrapped":
    """The server over an offline :class:`jaxpage.LLM`'s engine, tokenizer, chat template and
    sampling defaults (its generation config). The server's thread owns the engine from its
    start on: do not call ``llm.generate`` while it runs."""
    defaults = llm.get_default_sampling_params()
    config = ServerConfig(
        model_name=model_name, max_model_len=llm.engine.max_model_len, tokenizer=llm.tokenizer,
        chat_template=llm.loaded.chat_template,
        default_sampling={k: getattr(defaults, k) for k in
                          ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")},
        api_key=api_key, max_body_bytes=max_body_bytes, drain_timeout_s=drain_timeout_s)
    return build_app(AsyncLLMEngine(llm.engine), config)


class _Wrapped:
    """The ASGI app with its middleware, keeping ``state`` reachable for tests and the CLI."""

    def __init__(self, asgi: Callable, serving: _Serving):
        self._asgi = asgi
        self.serving = serving

    async def __call__(self, scope, receive, send):
        await self._asgi(scope, receive, send)


# -- completions helpers -------------------------------------------------------------------------
def _completion_prompts(prompt, serving: _Serving) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]  # one prompt of token ids
    else:
        items = list(prompt)
    if not items:
        raise param_error("prompt", "must not be empty.")
    if len(items) > MAX_PROMPTS:
        raise param_error("prompt", f"allows at most {MAX_PROMPTS} prompts per request.")
    out = []
    for p in items:
        if isinstance(p, str):
            out.append((p, serving.encode(p)))
        else:
            if not p:
                raise param_error("prompt", "must contain at least one token.")
            out.append((None, list(p)))
    return out


def _completion_logprobs(serving: _Serving, c: CompletionOutput, start: int,
                         offset: int) -> dict | None:
    """OpenAI's legacy logprobs of tokens ``start:`` of a completion (text offsets from
    ``offset``)."""
    if c.logprobs is None:
        return None
    tokens, token_logprobs, top, offsets = [], [], [], []
    pos = offset
    for lp in c.logprobs[start:]:
        text = serving.token_text(lp.token_ids[0])
        tokens.append(text)
        token_logprobs.append(lp.logprobs[0])
        top.append({serving.token_text(t): v for t, v in zip(lp.token_ids[1:], lp.logprobs[1:])})
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def _chat_logprobs(serving: _Serving, c: CompletionOutput, start: int) -> dict | None:
    if c.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = serving.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(entry(lp.token_ids[0], lp.logprobs[0]), top_logprobs=[
        entry(t, v) for t, v in zip(lp.token_ids[1:], lp.logprobs[1:])])
        for lp in c.logprobs[start:]]}


def _stream_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _error_event(e: BaseException) -> str:
    err = e if isinstance(e, APIError) else APIError(
        500, f"internal error ({type(e).__name__})", type_="server_error", code="internal_error")
    if not isinstance(e, APIError):
        logger.exception("stream failed", exc_info=e)
    return _sse(err.body())


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, Any]]:
    """Outputs of several requests as they come: (stream index, output)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, s):
        try:
            async for out in s:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    left = len(streams)
    try:
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            with contextlib.suppress(BaseException):
                await s.aclose()


async def _completion_chunks(serving: _Serving, body: CompletionRequest, base: str,
                             prompts, params: SamplingParams) -> AsyncIterator[str]:
    created, name = int(time.time()), serving.config.model_name
    streams = [serving.stream(f"{base}-{i}", ids, params, text, body.cache_salt)
               for i, (text, ids) in enumerate(prompts)]
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    finals: dict[int, RequestOutput] = {}
    try:
        if body.echo:
            for i, (text, _) in enumerate(prompts):
                for k in range(body.n):
                    yield _sse({"id": base, "object": "text_completion", "created": created,
                                "model": name, "choices": [{"index": i * body.n + k,
                                                            "text": text or "", "logprobs": None,
                                                            "finish_reason": None}]})
        async for i, out in _merge(streams):
            if out.finished:
                finals[i] = out
            for c in out.outputs:
                index = i * body.n + c.index
                if c.finish_reason == "error":
                    raise APIError(500, out.error or "internal error while generating",
                                   type_="server_error", code="generation_failed")
                delta = c.text[sent_text.get(index, 0):]
                if (not delta and c.finish_reason is None
                        and len(c.token_ids) == sent_tokens.get(index, 0)):
                    continue  # (a new token without text yet, e.g. half a character, is sent)
                logprobs = _completion_logprobs(serving, c, sent_tokens.get(index, 0),
                                                sent_text.get(index, 0))
                sent_text[index] = len(c.text)
                sent_tokens[index] = len(c.token_ids)
                yield _sse({"id": base, "object": "text_completion", "created": created,
                            "model": name, "choices": [{
                                "index": index, "text": delta, "logprobs": logprobs,
                                "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason}]})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({"id": base, "object": "text_completion", "created": created,
                        "model": name, "choices": [], "usage": _usage(list(finals.values()))})
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in-band
        yield _error_event(e)
    yield "data: [DONE]\n\n"


async def _chat_chunks(serving: _Serving, body: ChatCompletionRequest, base: str, text: str,
                       ids: list[int], params: SamplingParams) -> AsyncIterator[str]:
    created, name = int(time.time()), serving.config.model_name

    def chunk(choices, **extra):
        return _sse(dict({"id": base, "object": "chat.completion.chunk", "created": created,
                          "model": name, "choices": choices}, **extra))

    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    final = None
    try:
        yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None} for k in range(params.n)])
        gen = serving.stream(base, ids, params, text, body.cache_salt)
        try:
            async for out in gen:
                final = out if out.finished else final
                for c in out.outputs:
                    if c.finish_reason == "error":
                        raise APIError(500, out.error or "internal error while generating",
                                       type_="server_error", code="generation_failed")
                    delta = c.text[sent_text.get(c.index, 0):]
                    if (not delta and c.finish_reason is None
                            and len(c.token_ids) == sent_tokens.get(c.index, 0)):
                        continue
                    logprobs = (_chat_logprobs(serving, c, sent_tokens.get(c.index, 0))
                                if body.logprobs else None)
                    sent_text[c.index] = len(c.text)
                    sent_tokens[c.index] = len(c.token_ids)
                    yield chunk([{"index": c.index,
                                  "delta": {"content": delta} if delta else {},
                                  "logprobs": logprobs, "finish_reason": c.finish_reason,
                                  "stop_reason": c.stop_reason}])
        finally:
            await gen.aclose()
        if body.stream_options and body.stream_options.include_usage and final is not None:
            yield chunk([], usage=_usage([final]))
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in-band
        yield _error_event(e)
    yield "data: [DONE]\n\n"


# -- metrics --------------------------------------------------------------------------------------
def _prometheus(engine: AsyncLLMEngine, serving: _Serving) -> str:
    """Prometheus text format: engine gauges and counters, and requests by route and status."""
    stats = engine.stats()
    lines = []

    def metric(name: str, kind: str, help_: str, value: float) -> None:
        lines.extend([f"# HELP jaxpage:{name} {help_}", f"# TYPE jaxpage:{name} {kind}",
                      f"jaxpage:{name} {value}"])

    metric("num_requests_running", "gauge", "Requests in the running batch.",
           stats.get("num_running", 0))
    metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
           stats.get("num_waiting", 0))
    metric("kv_cache_usage_perc", "gauge", "Fraction of KV pages in use.",
           stats.get("kv_cache_usage", 0.0))
    metric("num_free_pages", "gauge", "KV pages held by no request.",
           stats.get("num_free_pages", 0))
    metric("num_preemptions_total", "counter", "Requests preempted (recomputed).",
           stats.get("num_preemptions", 0))
    metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix "
           "cache.", stats.get("prefix_cache_queries", 0))
    metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
           stats.get("prefix_cache_hits", 0))
    metric("engine_steps_total", "counter", "Engine steps run.", stats.get("num_steps", 0))
    lines += ["# HELP jaxpage:http_requests_total HTTP requests by route and status.",
              "# TYPE jaxpage:http_requests_total counter"]
    lines += [f"jaxpage:http_requests_total{{{k}}} {v}"
              for k, v in sorted(serving.num_requests.items())]
    for histogram in serving.histograms.values():
        lines += histogram.lines()
    return "\n".join(lines) + "\n"
