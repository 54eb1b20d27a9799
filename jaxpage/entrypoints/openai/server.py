"""OpenAI-compatible HTTP server: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health``, ``/metrics``, ``/tokenize``, ``/detokenize`` (FastAPI over :class:`AsyncLLMEngine`).

What it promises under bad input (shared/RELIABILITY.md): every error is OpenAI-shaped,
``{"error": {"message", "type", "param", "code"}}``, with 400 for validation (never 422), 401
for a missing or wrong API key, 404 for an unknown model or route, 413 for a body over the cap,
503 with ``Retry-After`` when the queue is full or the engine is draining or dead, and 500
otherwise, never with a stack trace. A bad request is refused before anything is queued, and a
client that goes away (streaming or not) aborts its request, which frees its pages.

The package: ``protocol`` (request bodies), ``serving`` (what the routes share), ``responses``
(bodies and event streams), ``errors``, ``middleware`` (body cap, API key, counts) and
``metrics``; this module wires them into the app.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException

from jaxpage.engine.async_engine import AsyncLLMEngine
from jaxpage.entrypoints.openai import responses
from jaxpage.entrypoints.openai.errors import APIError, from_value_error, http_error
from jaxpage.entrypoints.openai.metrics import render_metrics
from jaxpage.entrypoints.openai.middleware import (api_key_middleware, body_limit_middleware,
                                                   count_middleware)
from jaxpage.entrypoints.llm import embedding_sampling_params
from jaxpage.entrypoints.openai.protocol import (MAX_PROMPTS, ChatCompletionRequest,
                                                 CompletionRequest, DetokenizeRequest,
                                                 EmbeddingRequest, TokenizeRequest)
from jaxpage.entrypoints.openai.serving import (MAX_BODY_BYTES, ServerConfig, Serving,
                                                all_or_none)
from jaxpage.sampling_params import BeamSearchParams, SamplingParams, param_error

logger = logging.getLogger("jaxpage")


def build_app(engine: AsyncLLMEngine, config: ServerConfig) -> "_Wrapped":
    """The ASGI app (FastAPI routes inside its middleware); the engine starts with the app's
    lifespan and drains at its shutdown."""
    serving = Serving(engine, config)

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
        return http_error(e.status_code, message,
                           "request_too_large" if e.status_code == 413 else None)

    @app.exception_handler(ValueError)
    async def _value_error(_req, e: ValueError):
        return from_value_error(e).response()

    @app.exception_handler(Exception)
    async def _internal(_req, e: Exception):
        logger.exception("request failed")
        return APIError(500, f"internal error ({type(e).__name__})", type_="server_error",
                        code="internal_error").response()

    # -- routes -------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        serving.admit(None)  # 503 while draining or down
        return PlainTextResponse("ok")

    @app.get("/version")
    async def version():
        from jaxpage import __version__
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "jaxpage", "max_model_len": config.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine.stats(), serving.metrics),
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
        body.check_supported()
        prompts = _completion_prompts(body.prompt, serving)
        base = f"cmpl-{uuid.uuid4().hex}"
        if body.use_beam_search:
            searches = [(text, ids, _beam_params(engine, body, ids, body.max_tokens,
                                                 body.logprobs)) for text, ids in prompts]
            results = await all_or_none([
                serving.beam_search(request, f"{base}-{i}", ids, bsp, text, body.cache_salt)
                for i, (text, ids, bsp) in enumerate(searches)])
            return responses.completion_body(serving.for_body(body), body, base, prompts,
                                             results)
        params = body.sampling_params(max_tokens=1 if body.prompt_only() else body.max_tokens,
                                      logprobs=body.logprobs, defaults=config.default_sampling)
        if body.echo and body.logprobs is not None:  # echoed prompt tokens come scored too
            params.prompt_logprobs = body.logprobs
        for _, ids in prompts:  # every prompt checked before any is queued
            engine.engine.validate_request(ids, params, cache_salt=body.cache_salt)
        if body.stream:
            return responses.stream_response(
                responses.completion_chunks(serving.for_body(body), body, base, prompts, params))
        results = await all_or_none([
            serving.run(request, f"{base}-{i}", ids, params, text, body.cache_salt)
            for i, (text, ids) in enumerate(prompts)])
        return responses.completion_body(serving.for_body(body), body, base, prompts, results)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        serving.admit(body.model)
        body._tool_parser = serving.tool_parser
        body.check_supported()
        text, ids = serving.chat_prompt(body.messages, body.add_generation_prompt,
                                        body.tools if body.tool_mode() else None,
                                        body.continue_final_message)
        if body.use_beam_search:
            bsp = _beam_params(engine, body, ids, body.output_limit(), body.logprobs)
            out = await serving.beam_search(request, f"chatcmpl-{uuid.uuid4().hex}", ids, bsp,
                                            text, body.cache_salt)
            return responses.chat_body(serving.for_body(body), body, out.request_id, out)
        params = body.sampling_params(max_tokens=body.output_limit(),
                                      logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                      defaults=config.default_sampling)
        base = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            engine.engine.validate_request(ids, params, cache_salt=body.cache_salt)
            return responses.stream_response(
                responses.chat_chunks(serving.for_body(body), body, base, text, ids, params))
        out = await serving.run(request, base, ids, params, text, body.cache_salt)
        return responses.chat_body(serving.for_body(body), body, base, out)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        serving.admit(body.model)
        prompts = _completion_prompts(body.input, serving, param="input")
        pp = body.pooling_params(config.hidden_size)
        params = embedding_sampling_params(body.truncate_prompt_tokens)
        for _, ids in prompts:  # every input checked before any is queued
            engine.engine.validate_request(ids, params)
        base = f"embd-{uuid.uuid4().hex}"
        results = await all_or_none([serving.run(request, f"{base}-{i}", ids, params, text, None)
                                     for i, (text, ids) in enumerate(prompts)])
        return responses.embedding_body(serving, body, pp, results)

    routes = {r.path for r in app.routes}
    asgi = body_limit_middleware(app, config.max_body_bytes)
    if config.api_key:
        asgi = api_key_middleware(asgi, config.api_key)
    return _Wrapped(count_middleware(asgi, serving.metrics, routes), serving)


def app_for_llm(llm, *, model_name: str, api_key: str | None = None,
                max_body_bytes: int = MAX_BODY_BYTES, drain_timeout_s: float = 30.0,
                tool_call_parser: str | None = None) -> "_Wrapped":
    """The server over an offline :class:`jaxpage.LLM`'s engine, tokenizer, chat template and
    sampling defaults (its generation config). The server's thread owns the engine from its
    start on: do not call ``llm.generate`` while it runs."""
    config = ServerConfig(
        model_name=model_name, max_model_len=llm.engine.max_model_len, tokenizer=llm.tokenizer,
        chat_template=llm.loaded.chat_template, default_sampling=llm.generation_defaults(),
        api_key=api_key, max_body_bytes=max_body_bytes, drain_timeout_s=drain_timeout_s,
        tool_call_parser=tool_call_parser, hidden_size=llm.loaded.config.hidden_size)
    return build_app(AsyncLLMEngine(llm.engine), config)


class _Wrapped:
    """The ASGI app with its middleware, keeping ``state`` reachable for tests and the CLI."""

    def __init__(self, asgi: Callable, serving: Serving):
        self._asgi = asgi
        self.serving = serving

    async def __call__(self, scope, receive, send):
        await self._asgi(scope, receive, send)


def _beam_params(engine: AsyncLLMEngine, body, ids: list[int], max_tokens: int | None,
                 logprobs) -> BeamSearchParams:
    """A ``use_beam_search`` request's BeamSearchParams for prompt ``ids``, checked as a
    plain request of as many tokens would be (context room, cache salt)."""
    bsp = body.beam_search_params(max_tokens=max_tokens, logprobs=logprobs,
                                  room=max(engine.engine.max_model_len - len(ids), 1))
    engine.engine.validate_request(ids, SamplingParams(max_tokens=bsp.max_tokens),
                                   cache_salt=body.cache_salt)
    return bsp


def _completion_prompts(prompt, serving: Serving,
                        param: str = "prompt") -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) of each prompt of a completions ``prompt`` (or an embeddings
    ``input``: ``param`` names the field in errors)."""
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]  # one prompt of token ids
    else:
        items = list(prompt)
    if not items:
        raise param_error(param, "must not be empty.")
    if len(items) > MAX_PROMPTS:
        raise param_error(param, f"allows at most {MAX_PROMPTS} prompts per request.")
    out = []
    for p in items:
        if isinstance(p, str):
            if not p:
                raise param_error(param, "must not contain an empty string.")
            out.append((p, serving.encode(p)))
        else:
            if not p:
                raise param_error(param, "must contain at least one token.")
            out.append((None, list(p)))
    return out
