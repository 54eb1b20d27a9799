"""What the routes share: the server's configuration, admission checks, tokenization and chat
templates, and running a request to its end (aborting it when the client goes away)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from jaxpage.engine.async_engine import AsyncLLMEngine, EngineDead, EngineUnavailable
from jaxpage.entrypoints.openai.errors import APIError, from_value_error, unavailable
from jaxpage.entrypoints.openai.metrics import ServerMetrics
from jaxpage.entrypoints.openai.protocol import MAX_MESSAGES, message_text
from jaxpage.entrypoints.openai.tool_parsers import get_parser
from jaxpage.entrypoints.beam_search import BeamSearch
from jaxpage.outputs import CompletionOutput, RequestOutput
from jaxpage.sampling_params import BeamSearchParams, SamplingParams, param_error

MAX_BODY_BYTES = 8 * 2**20
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
        tool_call_parser: the model's tool-call format (``tool_parsers``; e.g. "hermes"), which
            makes ``tool_choice="auto"`` servable; None refuses "auto".
        hidden_size: the model's hidden size (embeddings are at most that wide); None skips
            the check of ``dimensions`` before the request runs.
    """

    model_name: str
    max_model_len: int
    tokenizer: Any = None
    chat_template: str | None = None
    default_sampling: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    drain_timeout_s: float = 30.0
    tool_call_parser: str | None = None
    hidden_size: int | None = None  # the model's, for /v1/embeddings' ``dimensions`` check


class Serving:
    """The routes' shared state and steps, over one engine and one configuration."""

    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.tokenizer = config.tokenizer
        self._token_text: dict[int, str] = {}
        self.tool_parser = get_parser(config.tool_call_parser)
        self.metrics = ServerMetrics()

    def admit(self, model: str | None) -> None:
        """503 while the engine takes no new requests; 404 for another model's name."""
        if not self.engine.accepting:
            raise unavailable("the engine is " + ("draining" if self.engine.draining
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

    def chat_prompt(self, messages, add_generation_prompt: bool,
                    tools: list[dict] | None = None,
                    continue_final_message: bool = False) -> tuple[str, list[int]]:
        """The chat template over the messages (and the tools, for templates that show them)."""
        if len(messages) > MAX_MESSAGES:
            raise param_error("messages", f"allows at most {MAX_MESSAGES} messages.")
        tok = self.need_tokenizer("a chat")
        conv = [_template_message(m) for m in messages]
        try:
            text = tok.apply_chat_template(conv, tokenize=False,
                                           add_generation_prompt=(add_generation_prompt
                                                                  and not continue_final_message),
                                           chat_template=self.config.chat_template,
                                           **({"tools": tools} if tools else {}),
                                           **({"continue_final_message": True}
                                              if continue_final_message else {}))
        except Exception as e:  # a template's own raise_exception(), e.g. roles out of order
            raise param_error("messages", f"the chat template refused them: {e}") from None
        return text, list(tok(text, add_special_tokens=False)["input_ids"])

    def for_body(self, body) -> "Serving":
        """The view a response is rendered with: vLLM's ``return_tokens_as_token_ids`` shows
        every logprobs token as "token_id:N", for clients that need ids whatever the text."""
        return _TokenIds(self) if getattr(body, "return_tokens_as_token_ids", False) else self

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = (self.tokenizer.decode([token_id]) if self.tokenizer is not None
                    else f"token_id:{token_id}")
            self._token_text[token_id] = text
        return text

    async def run(self, request: Request, request_id: str, ids: list[int],
                  params: SamplingParams, prompt: str | None,
                  cache_salt: str | None) -> RequestOutput:
        """The request's final output; aborts it if the client disconnects first."""
        gen = self.stream(request_id, ids, params, prompt, cache_salt, final_only=True)

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

    async def beam_search(self, request: Request, request_id: str, ids: list[int],
                          params: BeamSearchParams, prompt: str | None,
                          cache_salt: str | None) -> RequestOutput:
        """``use_beam_search``: the prompt's ``beam_width`` best beams as the choices of one
        output. Each round runs every live beam's one-token step as a request of its own
        (together; prefix caching reuses the beams' pages), aborted with the rest if the
        client goes away; a failed step fails the whole search (a 500)."""
        search = BeamSearch([ids], params, self.engine.engine.eos_token_ids)
        while (seqs := search.round()) is not None:
            outs = await all_or_none([
                self.run(request, f"{request_id}-r{search.rounds}-{j}", seq,
                         search.step_params, None, cache_salt) for j, seq in enumerate(seqs)])
            for out in outs:
                if out.outputs[0].finish_reason == "error" or not out.outputs[0].logprobs:
                    raise APIError(500, out.error or "internal error while generating",
                                   type_="server_error", code="generation_failed")
            search.advance([out.outputs[0].logprobs[0] for out in outs])
        tok, n = self.tokenizer, len(ids)
        choices = [CompletionOutput(
            index=k, text=tok.decode(b.tokens[n:], skip_special_tokens=True) if tok else "",
            token_ids=b.tokens[n:], cumulative_logprob=b.cum_logprob, logprobs=None,
            finish_reason=b.finish_reason, stop_reason=b.stop_reason)
            for k, b in enumerate(search.results()[0].sequences)]
        return RequestOutput(request_id, prompt, ids, None, choices, finished=True)

    async def stream(self, request_id: str, ids: list[int], params: SamplingParams,
                     prompt: str | None, cache_salt: str | None,
                     final_only: bool = False) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self.engine.generate(request_id, ids, params, prompt=prompt,
                                                  cache_salt=cache_salt, final_only=final_only):
                if out.finished:
                    self.metrics.observe_finished(out)
                yield out
        except EngineUnavailable as e:
            raise unavailable(str(e), "engine_unavailable") from None
        except EngineDead as e:
            raise APIError(500, str(e), type_="server_error", code="engine_dead") from None
        except ValueError as e:
            raise from_value_error(e) from None


class _TokenIds:
    """A Serving whose ``token_text`` is the token's id ("token_id:N")."""

    def __init__(self, serving: Serving):
        self._serving = serving

    def __getattr__(self, name):
        return getattr(self._serving, name)

    @staticmethod
    def token_text(token_id: int) -> str:
        return f"token_id:{token_id}"


def _template_message(m) -> dict:
    """A message as chat templates read it: an assistant's tool calls with their arguments as
    objects (HF's convention; OpenAI sends them as JSON text), a tool answer's call id."""
    out: dict[str, Any] = {"role": m.role, "content": message_text(m)}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            fn = dict(call.get("function") or {})
            if isinstance(fn.get("arguments"), str):
                with contextlib.suppress(ValueError):
                    fn["arguments"] = json.loads(fn["arguments"])
            calls.append(dict(call, function=fn))
        out["tool_calls"] = calls
    return out


async def all_or_none(coros: list) -> list:
    """Runs the coroutines together; the first failure cancels the others (their requests are
    aborted) and raises."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
