"""Response bodies and server-sent-event streams of the completions and chat routes: choices,
usage, OpenAI's two logprobs formats, and errors raised after the status line (sent in-band)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi.responses import StreamingResponse

from jaxpage.engine.scheduler_output import Logprobs
from jaxpage.entrypoints.openai.errors import APIError
from jaxpage.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                                 EmbeddingRequest)
from jaxpage.entrypoints.openai.serving import Serving
from jaxpage.outputs import CompletionOutput, RequestOutput
from jaxpage.sampling_params import PoolingParams, SamplingParams

logger = logging.getLogger("jaxpage")


def usage(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def check_finished(out: RequestOutput) -> None:
    """A 500 if a step failed this request (only this one: the engine keeps serving)."""
    if any(c.finish_reason == "error" for c in out.outputs):
        raise APIError(500, out.error or "internal error while generating", type_="server_error",
                       code="generation_failed")


class _Sent:
    """How much of each choice a stream has sent: characters of text and tokens."""

    def __init__(self):
        self.text: dict[int, int] = {}
        self.tokens: dict[int, int] = {}

    def advance(self, key: int, c: CompletionOutput) -> tuple[str, int, int] | None:
        """(new text, first unsent token, first unsent character) of choice ``c``, or None when
        there is nothing new; a new token without text yet (half a character, or a model
        served without a tokenizer) is new."""
        text_start, token_start = self.text.get(key, 0), self.tokens.get(key, 0)
        delta = c.text[text_start:]
        if not delta and c.finish_reason is None and len(c.token_ids) == token_start:
            return None
        self.text[key], self.tokens[key] = len(c.text), len(c.token_ids)
        return delta, token_start, text_start


def completion_body(serving: Serving, body: CompletionRequest, base: str, prompts,
                    results: list[RequestOutput]) -> dict:
    """The non-streamed ``text_completion``: choice ``i * n + k`` is prompt i's completion k."""
    choices = []
    if body.prompt_only():  # echo, max_tokens=0: the one token each ran is dropped
        for out in results:
            for c in out.outputs:
                c.text, c.token_ids, c.finish_reason, c.stop_reason = "", [], "length", None
                c.logprobs = [] if c.logprobs is not None else None
    for i, (out, (text, ids)) in enumerate(zip(results, prompts)):
        check_finished(out)
        prefix = echo_text(serving, text, ids) if body.echo else ""
        # echo + logprobs: the prompt's tokens come first, scored (the first one not), as
        # OpenAI and vLLM answer
        lps = out.prompt_logprobs or []
        prompt = ([(t, lps[j] if j < len(lps) else None) for j, t in enumerate(ids)]
                  if body.echo and body.logprobs is not None else None)
        for c in out.outputs:
            choices.append({"index": i * body.n + c.index, "text": prefix + c.text,
                            "logprobs": completion_logprobs(serving, c, 0, 0, prompt),
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return {"id": base, "object": "text_completion", "created": int(time.time()),
            "model": serving.config.model_name, "choices": choices, "usage": usage(results)}


def echo_text(serving: Serving, text: str | None, ids: list[int]) -> str:
    """The echoed prompt: its text, or its token ids decoded (as vLLM echoes them)."""
    if text is not None:
        return text
    return serving.tokenizer.decode(ids) if serving.tokenizer is not None else ""


def tool_calls(body: ChatCompletionRequest,
               c: CompletionOutput) -> tuple[str | None, list[dict] | None]:
    """(content, ``tool_calls``) of a finished choice: a forced call's text is constrained to
    the tool's schema, so it parses unless a stop string cut it (then it stays content);
    "auto" reads calls back with the server's parser. No calls when none was made or forced,
    or the output was cut short."""
    mode = body.tool_mode()
    if mode is None or c.finish_reason != "stop":
        return c.text, None
    content = None
    if mode in ("named", "required"):
        try:
            parsed = json.loads(c.text)
        except json.JSONDecodeError:
            return c.text, None
        calls = ([(body.tool_choice["function"]["name"], c.text)] if mode == "named" else
                 [(call["name"], json.dumps(call["parameters"], ensure_ascii=False))
                  for call in parsed])
    else:
        content, calls = body._tool_parser.parse(c.text)
        if not calls:
            return c.text, None
    return content, [{"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
                      "function": {"name": name, "arguments": args}} for name, args in calls]


def chat_message(body: ChatCompletionRequest, c: CompletionOutput) -> tuple[dict, str | None]:
    """A choice's message and finish reason: with tool calls it is ``tool_calls`` (content
    None unless the model wrote text beside its calls), as OpenAI and vLLM answer."""
    content, calls = tool_calls(body, c)
    if calls is None:
        return {"role": "assistant", "content": c.text}, c.finish_reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


def chat_body(serving: Serving, body: ChatCompletionRequest, base: str,
              out: RequestOutput) -> dict:
    """The non-streamed ``chat.completion``."""
    check_finished(out)
    choices = []
    for c in out.outputs:
        message, finish = chat_message(body, c)
        choices.append({"index": c.index, "message": message,
                        "logprobs": chat_logprobs(serving, c, 0) if body.logprobs else None,
                        "finish_reason": finish, "stop_reason": c.stop_reason})
    return {"id": base, "object": "chat.completion", "created": int(time.time()),
            "model": serving.config.model_name, "choices": choices, "usage": usage([out])}


def embedding_body(serving: Serving, body: EmbeddingRequest, pp: PoolingParams,
                   results: list[RequestOutput]) -> dict:
    """``/v1/embeddings``' list: one embedding per input, as floats or as base64 of their
    little-endian float32 bytes (OpenAI's ``encoding_format``)."""
    data = []
    for i, out in enumerate(results):
        check_finished(out)
        if out.hidden is None:
            raise APIError(500, out.error or "no hidden state came back for the input",
                           type_="server_error", code="generation_failed")
        emb = pp.pool(out.hidden)
        if body.encoding_format == "base64":
            emb = base64.b64encode(np.asarray(emb, "<f4").tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": emb})
    prompt = sum(len(o.prompt_token_ids) for o in results)
    return {"object": "list", "data": data, "model": serving.config.model_name,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _logprob(value: float) -> float:
    """JSON has no -inf (a token a grammar forbids): vLLM's floor instead."""
    return max(value, -9999.0)


def completion_logprobs(serving: Serving, c: CompletionOutput, start: int, offset: int,
                        prompt: list[tuple[int, Logprobs | None]] | None = None) -> dict | None:
    """OpenAI's legacy logprobs of tokens ``start:`` of a completion (text offsets from
    ``offset``), after ``prompt``'s (token id, its Logprobs or None: unscored) if given."""
    if c.logprobs is None:
        return None
    tokens, token_logprobs, top, offsets = [], [], [], []
    pos = offset
    entries = (prompt or []) + [(lp.token_ids[0], lp) for lp in c.logprobs[start:]]
    for token_id, lp in entries:
        text = serving.token_text(token_id)
        tokens.append(text)
        token_logprobs.append(None if lp is None else _logprob(lp.logprobs[0]))
        top.append(None if lp is None else {serving.token_text(t): _logprob(v)
                                            for t, v in zip(lp.token_ids[1:], lp.logprobs[1:])})
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(serving: Serving, c: CompletionOutput, start: int) -> dict | None:
    if c.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = serving.token_text(token_id)
        return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(entry(lp.token_ids[0], lp.logprobs[0]), top_logprobs=[
        entry(t, v) for t, v in zip(lp.token_ids[1:], lp.logprobs[1:])])
        for lp in c.logprobs[start:]]}


def stream_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def error_event(e: BaseException) -> str:
    err = e if isinstance(e, APIError) else APIError(
        500, f"internal error ({type(e).__name__})", type_="server_error", code="internal_error")
    if not isinstance(e, APIError):
        logger.exception("stream failed", exc_info=e)
    return sse(err.body())


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, Any]]:
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


async def completion_chunks(serving: Serving, body: CompletionRequest, base: str,
                             prompts, params: SamplingParams) -> AsyncIterator[str]:
    created, name = int(time.time()), serving.config.model_name
    streams = [serving.stream(f"{base}-{i}", ids, params, text, body.cache_salt)
               for i, (text, ids) in enumerate(prompts)]
    sent = _Sent()
    finals: dict[int, RequestOutput] = {}
    try:
        if body.echo:
            for i, (text, _) in enumerate(prompts):
                for k in range(body.n):
                    yield sse({"id": base, "object": "text_completion", "created": created,
                                "model": name, "choices": [{"index": i * body.n + k,
                                                            "text": text or "", "logprobs": None,
                                                            "finish_reason": None}]})
        async for i, out in merge(streams):
            check_finished(out)
            if out.finished:
                finals[i] = out
            for c in out.outputs:
                index = i * body.n + c.index
                new = sent.advance(index, c)
                if new is None:
                    continue
                delta, token_start, text_start = new
                logprobs = completion_logprobs(serving, c, token_start, text_start)
                yield sse({"id": base, "object": "text_completion", "created": created,
                            "model": name, "choices": [{
                                "index": index, "text": delta, "logprobs": logprobs,
                                "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason}]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({"id": base, "object": "text_completion", "created": created,
                        "model": name, "choices": [], "usage": usage(list(finals.values()))})
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in-band
        yield error_event(e)
    yield "data: [DONE]\n\n"


async def chat_chunks(serving: Serving, body: ChatCompletionRequest, base: str, text: str,
                       ids: list[int], params: SamplingParams) -> AsyncIterator[str]:
    created, name = int(time.time()), serving.config.model_name

    def chunk(choices, **extra):
        return sse(dict({"id": base, "object": "chat.completion.chunk", "created": created,
                          "model": name, "choices": choices}, **extra))

    sent = _Sent()
    final = None
    mode = body.tool_mode()
    forced = mode in ("named", "required")  # the call goes out whole once its JSON is complete
    parser = body._tool_parser if mode == "auto" else None
    ended: set[int] = set()
    try:
        yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None} for k in range(params.n)])
        gen = serving.stream(base, ids, params, text, body.cache_salt)
        try:
            async for out in gen:
                check_finished(out)
                final = out if out.finished else final
                for c in out.outputs:
                    if forced and (c.finish_reason is None or c.index in ended):
                        continue
                    if parser is not None:  # content streams up to a call's start tag
                        if c.index in ended:
                            continue
                        text_sent = sent.text.get(c.index, 0)
                        safe = parser.safe_prefix(c.text)
                        if c.finish_reason is None:
                            if safe > text_sent:
                                sent.text[c.index] = safe
                                yield chunk([{"index": c.index,
                                              "delta": {"content": c.text[text_sent:safe]},
                                              "logprobs": None, "finish_reason": None}])
                            continue
                        ended.add(c.index)
                        _, calls = tool_calls(body, c)
                        rest = c.text[text_sent:safe if calls else None]
                        delta = {"content": rest} if rest else {}
                        if calls:
                            delta["tool_calls"] = [dict(call, index=i)
                                                   for i, call in enumerate(calls)]
                        yield chunk([{"index": c.index, "delta": delta, "logprobs": None,
                                      "finish_reason": "tool_calls" if calls
                                      else c.finish_reason, "stop_reason": c.stop_reason}])
                        continue
                    if forced:
                        ended.add(c.index)
                        message, finish = chat_message(body, c)
                        calls = message.get("tool_calls")
                        delta = ({"tool_calls": [dict(call, index=i) for i, call in
                                                 enumerate(calls)]} if calls else
                                 {"content": c.text})
                        yield chunk([{"index": c.index, "delta": delta,
                                      "logprobs": chat_logprobs(serving, c, 0) if body.logprobs
                                      else None, "finish_reason": finish,
                                      "stop_reason": c.stop_reason}])
                        continue
                    new = sent.advance(c.index, c)
                    if new is None:
                        continue
                    delta, token_start, _ = new
                    logprobs = chat_logprobs(serving, c, token_start) if body.logprobs else None
                    yield chunk([{"index": c.index,
                                  "delta": {"content": delta} if delta else {},
                                  "logprobs": logprobs, "finish_reason": c.finish_reason,
                                  "stop_reason": c.stop_reason}])
        finally:
            await gen.aclose()
        if body.stream_options and body.stream_options.include_usage and final is not None:
            yield chunk([], usage=usage([final]))
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in-band
        yield error_event(e)
    yield "data: [DONE]\n\n"
