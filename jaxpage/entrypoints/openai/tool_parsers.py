"""Tool calls written by the model itself (``tool_choice="auto"``), read back out of its text.

A parser knows one model family's format; the server takes it by name (``--tool-call-parser``,
vLLM's flag) and only then serves ``"auto"``. Today: ``hermes`` — ``<tool_call>{"name": ...,
"arguments": {...}}</tool_call>`` blocks, the format of Qwen2.5 / Qwen3 and Hermes chat
templates. A block that does not parse leaves the whole answer as content (as vLLM does).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCallParser:
    name: str
    start_tag: str  # text that opens a call: a stream holds back what could begin it

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        """(content outside the calls or None, [(function name, arguments as JSON text)]);
        no calls when the text has none or one does not parse."""
        raise NotImplementedError

    def safe_prefix(self, text: str) -> int:
        """How much of ``text`` can stream as content now: up to a call's start tag, and
        never a tail that could still become one."""
        at = text.find(self.start_tag)
        if at >= 0:
            return at
        for k in range(min(len(self.start_tag) - 1, len(text)), 0, -1):
            if self.start_tag.startswith(text[-k:]):
                return len(text) - k
        return len(text)


class HermesParser(ToolCallParser):
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def __init__(self):
        super().__init__("hermes", "<tool_call>")

    def parse(self, text):
        if self.start_tag not in text:
            return text, []
        calls = []
        for body in self._BLOCK.findall(text):
            try:
                obj = json.loads(body)
            except json.JSONDecodeError:
                return text, []
            args = obj.get("arguments", {}) if isinstance(obj, dict) else None
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not \
                    isinstance(args, (dict, str)):
                return text, []
            calls.append((obj["name"], args if isinstance(args, str)
                          else json.dumps(args, ensure_ascii=False)))
        content = self._BLOCK.sub("", text).strip()
        return content or None, calls


TOOL_CALL_PARSERS = {"hermes": HermesParser}


def get_parser(name: str | None) -> ToolCallParser | None:
    if name is None:
        return None
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(TOOL_CALL_PARSERS)}")
    return TOOL_CALL_PARSERS[name]()
