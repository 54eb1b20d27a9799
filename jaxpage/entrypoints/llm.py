"""Offline inference with vLLM's API: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from typing import Any

from jaxpage.config import EngineArgs
from jaxpage.outputs import RequestOutput
from jaxpage.sampling_params import GENERATION_DEFAULT_FIELDS, SamplingParams

logger = logging.getLogger("jaxpage")

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """An offline engine over one model.

    Args:
        model: "default" (SmolLM2-135M-Instruct, fetched once into ~/.cache/jaxpage), an HF
            model directory (config.json + *.safetensors + tokenizer), or a ``.gguf`` file.
        **kwargs: any :class:`jaxpage.config.EngineArgs` field (``dtype``, ``max_model_len``,
            ``max_num_seqs``, ``max_num_batched_tokens``, ``block_size``, ``num_pages``,
            ``gpu_memory_utilization``, ``enable_prefix_caching``, ``attention_backend``, ...).
    """

    def __init__(self, model: str = "default", **kwargs: Any):
        from jaxpage.entrypoints.engine_builder import build_engine

        unknown = set(kwargs) - set(EngineArgs.__dataclass_fields__)
        if unknown:
            raise TypeError(f"LLM() got unknown arguments {sorted(unknown)}; "
                            f"valid ones: {sorted(EngineArgs.__dataclass_fields__)}")
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.engine, self.loaded = build_engine(self.engine_args)
        self.tokenizer = self.loaded.tokenizer
        self._counter = itertools.count()

    def get_tokenizer(self):
        """The model's tokenizer (None for a checkpoint without one, e.g. dummy weights)."""
        return self.tokenizer

    # -- generation ---------------------------------------------------------------------------
    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's rule: the model's generation_config.json sampling defaults, else ours."""
        return SamplingParams(**self.generation_defaults())

    def generation_defaults(self) -> dict[str, Any]:
        """The sampling fields the model's generation_config.json sets."""
        gen = self.loaded.generation_config or {}
        return {k: gen[k] for k in GENERATION_DEFAULT_FIELDS if gen.get(k) is not None}

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates completions for every prompt; outputs come back in prompt order.

        Args:
            prompts: a string, a list of strings, a list of token ids, a list of token-id lists,
                or dicts ``{"prompt": str}`` / ``{"prompt_token_ids": list[int]}``.
            sampling_params: one for all prompts, or one per prompt (None: model defaults).
            use_tqdm: show a progress bar.

        Raises:
            ValueError: a bad prompt or parameter; raised before any request is queued.
        """
        items = _normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"got {len(params)} sampling_params for {len(items)} prompts.")
        requests = [(text, self._tokenize(text, ids), sp) for (text, ids), sp in zip(items, params)]
        for _, ids, sp in requests:  # validate everything before queueing anything
            self.engine.validate_request(ids, sp)
        req_ids = []
        try:
            for text, ids, sp in requests:
                req_id = str(next(self._counter))
                self.engine.add_request(req_id, ids, sp, prompt=text, final_only=True)
                req_ids.append(req_id)
            return self._run(req_ids, use_tqdm)
        except BaseException:
            self.engine.abort_request(req_ids)
            raise

    def embed(self, prompts: PromptType | Sequence[PromptType], pooling_params=None,
              use_tqdm: bool = False, truncate_prompt_tokens: int | None = None) -> list:
        """Embeddings (vLLM's ``LLM.embed``): each prompt's final-normed hidden state at its
        last token (last-token pooling, vLLM's default for decoder models), cut to
        ``pooling_params.dimensions`` and L2-normalized unless ``normalize=False``. The prompts
        run through the engine like any request (batched, chunked, prefix-cached) and stop at
        their first token, which is dropped; ``truncate_prompt_tokens`` keeps each prompt's
        last that many tokens. Returns ``EmbeddingRequestOutput``s in prompt order.

        Raises:
            ValueError: a bad prompt or ``dimensions`` (before any request is queued);
            RuntimeError: a request failed inside the engine.
        """
        from jaxpage.outputs import EmbeddingOutput, EmbeddingRequestOutput
        from jaxpage.sampling_params import PoolingParams

        pp = PoolingParams() if pooling_params is None else pooling_params
        if not isinstance(pp, PoolingParams):
            raise ValueError(f"pooling_params must be a PoolingParams, got {type(pp).__name__}.")
        pp.check(self.loaded.config.hidden_size)  # before anything is queued
        outs = self.generate(prompts, embedding_sampling_params(truncate_prompt_tokens),
                             use_tqdm=use_tqdm)
        failed = [o for o in outs if o.hidden is None]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(outs)} requests failed in the engine: "
                               f"{failed[0].error}")
        return [EmbeddingRequestOutput(o.request_id, o.prompt_token_ids,
                                       EmbeddingOutput(pp.pool(o.hidden)))
                for o in outs]

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params,
                    use_tqdm: bool = False) -> list:
        """Beam search (vLLM's ``LLM.beam_search``): ``params`` is a ``BeamSearchParams``;
        returns one ``BeamSearchOutput`` per prompt, its best ``beam_width`` sequences first
        (``jaxpage/entrypoints/beam_search.py`` has the algorithm and the score).

        Raises:
            ValueError: a bad prompt, or one whose prompt + max_tokens exceeds the context.
        """
        from jaxpage.entrypoints.beam_search import BeamSearchParams, run_beam_search

        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}.")
        ids = [self._tokenize(text, tok) for text, tok in _normalize_prompts(prompts)]
        return run_beam_search(self, ids, params, self.engine.eos_token_ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, *, chat_template: str | None = None,
             add_generation_prompt: bool = True, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None,
             continue_final_message: bool = False) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation (or a list) and generates.
        ``tools`` (OpenAI's format) and ``chat_template_kwargs`` go to the template, as in
        vLLM; reading tool calls back out of the text is the caller's (or the server's).
        ``continue_final_message`` (vLLM's): the prompt ends inside the last message, an
        assistant's, which the output continues (no generation prompt after it)."""
        if not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts.")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            _validate_messages(conv)
            if continue_final_message and conv[-1]["role"] != "assistant":
                raise ValueError("continue_final_message needs the last message to be the "
                                 "assistant's (the text the output continues).")
            text = self.tokenizer.apply_chat_template(
                conv, tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                chat_template=chat_template or self.loaded.chat_template,
                **({"tools": tools} if tools else {}),
                **({"continue_final_message": True} if continue_final_message else {}),
                **(chat_template_kwargs or {}))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    # -- internals ----------------------------------------------------------------------------
    def _tokenize(self, text: str | None, ids: list[int] | None) -> list[int]:
        if ids is not None:
            return ids
        if not text:
            raise ValueError("prompt must be a non-empty string.")
        return list(self.tokenizer(text)["input_ids"])

    def _run(self, req_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(req_ids)
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and not os.environ.get("JAXPAGE_NO_TQDM"):
            from tqdm.auto import tqdm
            bar = tqdm(total=len(req_ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while pending:
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError(f"engine went idle with {len(pending)} requests unfinished")
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [done[r] for r in req_ids]


def embedding_sampling_params(truncate_prompt_tokens: int | None = None) -> SamplingParams:
    """What an embedding request runs as: its prompt (its last ``truncate_prompt_tokens``)
    and one greedy token (dropped), with the last prompt token's final hidden state
    returned."""
    return SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, return_hidden=True,
                          skip_special_tokens=True,
                          truncate_prompt_tokens=truncate_prompt_tokens)


def _normalize_prompts(prompts) -> list[tuple[str | None, list[int] | None]]:
    """-> [(text or None, token ids or None)], one per prompt."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    elif isinstance(prompts, Sequence) and prompts and all(_is_token(t) for t in prompts):
        prompts = [list(prompts)]  # a single prompt given as token ids
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty string, list of strings or list of token-id lists.")
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append((p, None))
        elif isinstance(p, dict):
            ids = p.get("prompt_token_ids")
            if ids is None and not isinstance(p.get("prompt"), str):
                raise ValueError("a prompt dict needs 'prompt' (str) or 'prompt_token_ids' (list[int]).")
            out.append((p.get("prompt"), _check_ids(ids) if ids is not None else None))
        elif isinstance(p, Sequence):
            out.append((None, _check_ids(p)))
        else:
            raise ValueError(f"unsupported prompt type {type(p).__name__}.")
    return out


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _check_ids(ids) -> list[int]:
    ids = list(ids)
    if not ids:
        raise ValueError("prompt must contain at least one token.")
    if not all(_is_token(t) for t in ids):
        raise ValueError("prompt_token_ids must be a list of integers.")
    return ids


def _validate_messages(conv) -> None:
    if not isinstance(conv, list) or not conv:
        raise ValueError("a conversation must be a non-empty list of messages.")
    for m in conv:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                isinstance(m.get("content"), str) or m.get("tool_calls")):
            raise ValueError("each message must be a dict with string 'role' and 'content' "
                             "(content may be None beside 'tool_calls').")
