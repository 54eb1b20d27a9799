"""The hermes tool-call parser on hand-written model outputs (the served path: the tool-call
tests in test_structured_outputs.py)."""

from __future__ import annotations

import json

import pytest

from jaxpage.entrypoints.openai.tool_parsers import get_parser

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_calls_and_the_content_around_them():
    p = get_parser("hermes")
    assert p.parse("no calls here") == ("no calls here", [])
    content, calls = p.parse("Let me look.\n" + CALL + "\n" + CALL.replace("Paris", "Lyon"))
    assert content == "Let me look."
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Paris"}),
                                                      ("get_weather", {"city": "Lyon"})]
    assert p.parse(CALL)[0] is None
    unterminated = CALL.removesuffix("\n</tool_call>")  # the model stopped at EOS
    assert p.parse(unterminated)[1] == [("get_weather", '{"city": "Paris"}')]
    as_text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    assert p.parse(as_text)[1] == [("f", '{"x": 1}')]


@pytest.mark.parametrize("bad", ['<tool_call>{"name": "f", "arguments": </tool_call>',
                                 '<tool_call>{"arguments": {}}</tool_call>',
                                 '<tool_call>["f"]</tool_call>',
                                 '<tool_call>{"name": "f", "arguments": 3}</tool_call>'])
def test_a_call_that_does_not_parse_leaves_it_all_content(bad):
    assert get_parser("hermes").parse("hi " + bad) == ("hi " + bad, [])


def test_what_may_stream_before_a_call():
    p = get_parser("hermes")
    assert p.safe_prefix("plain text") == len("plain text")
    assert p.safe_prefix("text <tool") == len("text ")  # could become the tag
    assert p.safe_prefix("text <tool_call>{") == len("text ")
    assert p.safe_prefix("a < b") == len("a < b")
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        get_parser("nope")
