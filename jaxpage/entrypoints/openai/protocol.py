"""Request bodies of the OpenAI-compatible routes (pydantic), and their mapping onto
:class:`SamplingParams`, where every value is validated (one validator for every front end).

Fields follow the OpenAI API; vLLM's extra sampling fields (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
``skip_special_tokens``, ``include_stop_str_in_output``, ``cache_salt``, and beam search's
``use_beam_search`` / ``length_penalty``) are accepted too.
Structured outputs come as OpenAI's ``response_format`` (``json_object``, ``json_schema``), as
vLLM's ``structured_outputs`` object, or as vLLM's older ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar`` fields; one of them per request.
Unknown fields are ignored, as OpenAI clients send fields a server may not know.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from jaxpage.sampling_params import (GENERATION_DEFAULT_FIELDS, MAX_LOGIT_BIAS, BeamSearchParams,
                                     PoolingParams, SamplingParams, StructuredOutputsParams,
                                     param_error)

# OpenAI's own cap on the completions route's ``logprobs``; chat's ``top_logprobs`` is 20.
MAX_COMPLETION_LOGPROBS = 5
MAX_PROMPTS = 128  # prompts in one completions request (RELIABILITY.md: bounded everything)
MAX_MESSAGES = 1024
MAX_TOOLS = 128


class _Body(BaseModel):
    # Strict types: "0.5" is no temperature and true is no token id (JSON numbers still fill
    # float fields); unknown fields are ignored.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: str | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs tokens as "token_id:N"
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the prompt's last k tokens
    use_beam_search: bool = False  # vLLM's: the n best beams of width n, not n samples
    length_penalty: float = 1.0  # beam search's ranking: cum_logprob / len ** length_penalty

    def tool_constraint(self) -> tuple[str, dict] | None:
        """(field, StructuredOutputsParams fields) forced by a tool choice; chat overrides."""
        return None

    def structured(self) -> StructuredOutputsParams | None:
        """The request's output constraint, from whichever of its fields names one."""
        sources = [] if (tc := self.tool_constraint()) is None else [tc]
        rf = self.response_format
        if rf is not None and rf.get("type") not in (None, "text"):
            kind = rf.get("type")
            if kind == "json_object":
                sources.append(("response_format", dict(json_object=True)))
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, dict):
                    raise param_error("response_format", "json_schema needs a 'json_schema' "
                                      "object holding the 'schema' (a JSON schema object).")
                sources.append(("response_format", dict(json=schema)))
            else:
                raise param_error("response_format", "type must be 'text', 'json_object' or "
                                  f"'json_schema', got {kind!r}.")
        if self.structured_outputs is not None:
            known = {"json", "regex", "choice", "grammar", "json_object",
                     "disable_any_whitespace", "whitespace_pattern"}
            unknown = sorted(set(self.structured_outputs) - known)
            if unknown:
                raise param_error("structured_outputs", f"has unsupported fields {unknown}; "
                                  f"supported: {sorted(known)}.")
            sources.append(("structured_outputs", dict(self.structured_outputs)))
        for name, field in (("guided_json", "json"), ("guided_regex", "regex"),
                            ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                sources.append((name, {field: getattr(self, name)}))
        if not sources:
            return None
        if len(sources) > 1:
            raise param_error(sources[1][0], "one output constraint per request: "
                              f"{', '.join(n for n, _ in sources)} were given.")
        name, fields = sources[0]
        if self.guided_whitespace_pattern is not None:
            fields.setdefault("whitespace_pattern", self.guided_whitespace_pattern)
        try:
            return StructuredOutputsParams(**fields)
        except ValueError as e:
            raise param_error(name, str(e).removeprefix("structured_outputs ")) from None

    def beam_search_params(self, *, max_tokens: int | None, room: int,
                           logprobs: Any) -> BeamSearchParams:
        """The ``use_beam_search`` request's BeamSearchParams (beam width ``n``; up to ``room``
        tokens, what the context leaves, when ``max_tokens`` is omitted). Refuses, naming the
        field, what beam search would otherwise ignore: streaming, logprobs, output
        constraints and tools, and any sampling field set off its neutral value."""
        neutral = dict(top_p=None, top_k=None, min_p=None, presence_penalty=0.0,
                       frequency_penalty=0.0, repetition_penalty=None, seed=None, stop=None,
                       stop_token_ids=None, min_tokens=0, logit_bias=None, stream=False,
                       response_format=None, structured_outputs=None, guided_json=None,
                       guided_regex=None, guided_choice=None, guided_grammar=None)
        for name, value in neutral.items():
            if getattr(self, name) != value and not (
                    name == "response_format" and (self.response_format or {}).get("type")
                    in (None, "text")):
                raise param_error(name, "is not supported with use_beam_search.")
        if logprobs:
            raise param_error("logprobs", "is not supported with use_beam_search.")
        if self.tool_constraint() is not None:
            raise param_error("tool_choice", "is not supported with use_beam_search.")
        try:
            return BeamSearchParams(
                beam_width=self.n, max_tokens=room if max_tokens is None else max_tokens,
                ignore_eos=self.ignore_eos, temperature=self.temperature or 0.0,
                length_penalty=self.length_penalty)
        except ValueError as e:
            field = {"beam_width": "n"}.get(str(e).split(" ", 1)[0], str(e).split(" ", 1)[0])
            raise param_error(field, str(e).split(" ", 1)[1]) from None

    def sampling_params(self, *, max_tokens: int | None, logprobs: int | None,
                        defaults: dict[str, Any]) -> SamplingParams:
        """SamplingParams of this body; ``defaults`` (the model's generation config) fill the
        fields the client left out. Raises ``ValueError`` naming the field."""
        bias = None
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise param_error("logit_bias", f"allows at most {MAX_LOGIT_BIAS} entries.")
            try:
                bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise param_error("logit_bias", "keys must be token ids (integers).") from None
        picked = {k: getattr(self, k) if getattr(self, k) is not None else defaults.get(k)
                  for k in GENERATION_DEFAULT_FIELDS}
        return SamplingParams(
            n=self.n, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, logit_bias=bias,
            structured_outputs=self.structured(),
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            **{k: v for k, v in picked.items() if v is not None})


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # omitted: up to the context limit (RELIABILITY.md)
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


    def check_supported(self) -> None:
        """Refuses what this server does not do (a 400 naming the field)."""
        if self.suffix:
            raise param_error("suffix", "is not supported.")
        if self.best_of is not None and self.best_of != self.n:
            raise param_error("best_of", "must equal n (or be omitted); best-of search is not "
                              "supported.")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise param_error("logprobs", f"must be in [0, {MAX_COMPLETION_LOGPROBS}], got "
                              f"{self.logprobs}.")
        if self.echo and self.logprobs is not None and self.stream:
            raise param_error("echo", "with logprobs is not supported when streaming.")
        if self.max_tokens == 0 and self.stream:
            raise param_error("max_tokens", "0 (the echoed prompt alone) is not supported when "
                              "streaming.")
        if self.max_tokens == 0 and not self.echo:
            raise param_error("max_tokens", "must be at least 1 (0 only with echo: the prompt "
                              "alone, scored with logprobs).")

    def prompt_only(self) -> bool:
        """``echo`` with ``max_tokens=0``: the prompt alone (and its logprobs), as evaluation
        harnesses ask for a text's likelihood. It runs as one token, then dropped."""
        return self.echo and self.max_tokens == 0


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message answers this call


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's: the reply continues the last message
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    # the server's parser of the model's own tool-call format (``tool_parsers``): set by the
    # route, it makes ``tool_choice="auto"`` servable
    _tool_parser: Any = PrivateAttr(default=None)


    def functions(self) -> dict[str, dict]:
        """name -> the tool's ``function`` object, checked (OpenAI's ``tools`` format)."""
        if not self.tools:
            return {}
        if len(self.tools) > MAX_TOOLS:
            raise param_error("tools", f"allows at most {MAX_TOOLS} tools.")
        out: dict[str, dict] = {}
        for tool in self.tools:
            fn = tool.get("function") if tool.get("type") == "function" else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(name, str) or not name:
                raise param_error("tools", "each tool must be {'type': 'function', 'function': "
                                  "{'name': ..., 'parameters': {...}}}.")
            params = fn.get("parameters", {"type": "object"})
            if not isinstance(params, dict):
                raise param_error("tools", f"function {name!r}: parameters must be a JSON "
                                  "schema object.")
            out[name] = dict(fn, parameters=params)
        return out

    def tool_mode(self) -> str | None:
        """None (tools unused), "named" or "required" (a call forced by a constraint), or
        "auto" (the model may call, read back by the server's parser); refuses the rest."""
        fns = self.functions()
        choice = self.tool_choice
        if not fns:
            if choice not in (None, "none"):
                raise param_error("tool_choice", "needs tools.")
            return None
        if choice == "none":
            return None
        if choice in (None, "auto"):
            if self._tool_parser is not None:
                return "auto"
            raise param_error("tool_choice", "'auto' (the default with tools) needs a tool-call "
                              "parser for the model's own format (start the server with "
                              "--enable-auto-tool-choice --tool-call-parser NAME); or use "
                              "'required', name a function, or 'none'.")
        if choice == "required":
            return "required"
        name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
        if not (isinstance(choice, dict) and choice.get("type") == "function" and name):
            raise param_error("tool_choice", "must be 'none', 'auto', 'required' or "
                              "{'type': 'function', 'function': {'name': ...}}.")
        if name not in fns:
            raise param_error("tool_choice", f"names {name!r}, which is not among the tools.")
        return "named"

    def tool_constraint(self) -> tuple[str, dict] | None:
        """A forced tool call as an output constraint: a named function's arguments follow its
        parameters schema; ``required`` is a JSON array of {"name", "parameters"} calls (one
        when ``parallel_tool_calls`` is false), as vLLM does."""
        mode = self.tool_mode()
        if mode in (None, "auto"):
            return None
        fns = self.functions()
        if mode == "named":
            return "tool_choice", dict(json=fns[self.tool_choice["function"]["name"]]["parameters"])
        calls = {"anyOf": [{"type": "object", "additionalProperties": False,
                            "required": ["name", "parameters"],
                            "properties": {"name": {"const": name},
                                           "parameters": fn["parameters"]}}
                           for name, fn in fns.items()]}
        schema = dict(type="array", minItems=1, items=calls,
                      **({} if self.parallel_tool_calls else {"maxItems": 1}))
        return "tool_choice", dict(json=schema)

    def check_supported(self) -> None:
        """Refuses what this server does not do (a 400 naming the field)."""
        self.tool_mode()
        if self.top_logprobs is not None and not self.logprobs:
            raise param_error("top_logprobs", "needs logprobs: true.")
        if self.continue_final_message:
            if self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
                raise param_error("continue_final_message", "and add_generation_prompt cannot "
                                  "both be true.")
            if self.messages[-1].role != "assistant":
                raise param_error("continue_final_message", "needs the last message to be the "
                                  "assistant's (the text the reply continues).")

    def output_limit(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name) over ``max_tokens``."""
        return (self.max_completion_tokens if self.max_completion_tokens is not None
                else self.max_tokens)


class EmbeddingRequest(_Body):
    """OpenAI's ``/v1/embeddings`` body (``user`` accepted and unused)."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's: keep each input's last k tokens

    def pooling_params(self, hidden_size: int | None) -> PoolingParams:
        pp = PoolingParams(dimensions=self.dimensions)
        if hidden_size is not None:
            pp.check(hidden_size)  # dimensions past the model's: a 400
        return pp


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def message_text(message: ChatMessage) -> str:
    """A message's content as one string: OpenAI's content parts of type "text" joined; any
    other part (images, audio) is refused, since the models here read text only."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise param_error("messages", f"content parts of type {part.get('type')!r} are not "
                               "supported; only 'text'.")
        texts.append(part["text"])
    return "\n".join(texts)
