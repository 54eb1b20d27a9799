"""The host side of structured outputs: cached compiles hand out independent matchers, and
the parallel mask fill writes what the one-row fill writes."""

from __future__ import annotations

import numpy as np

from jaxpage.engine import structured_output
from jaxpage.engine.structured_output import GrammarCompiler, fill_bitmasks
from jaxpage.sampling_params import StructuredOutputsParams as SO
from tests.engine.test_detokenizer import build_tokenizer

SO_KINDS = [SO(regex=r"[a-c]{2,6}x"), SO(choice=["one", "two", "three"]),
            SO(json={"type": "object", "properties": {"k": {"type": "integer"}}}),
            SO(grammar='start: "(" NUM ")"\nNUM: /[0-9]+/')]


def _allowed(mask_row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask_row.view(np.uint8), bitorder="little"))


def test_parallel_fill_equals_one_row_fills():
    tok = build_tokenizer()
    compiler = GrammarCompiler(tok, len(tok), [tok.eos_token_id])
    rng = np.random.default_rng(0)
    grammars = []
    for i in range(12):  # each walked a different number of allowed tokens
        g = compiler.compile(SO_KINDS[i % len(SO_KINDS)])
        row = np.zeros((1, -(-len(tok) // 32)), np.int32)
        for _ in range(i % 4):
            g.fill_bitmask(row, 0)
            allowed = _allowed(row[0])
            if g.terminated or not len(allowed):
                break
            assert g.accept([int(rng.choice(allowed))])
        grammars.append(g)
    words = -(-len(tok) // 32)
    serial = np.full((16, words), -1, np.int32)
    for i, g in enumerate(grammars):
        g.fill_bitmask(serial, i + 2)
    parallel = np.full((16, words), -1, np.int32)
    fill_bitmasks(parallel, [(i + 2, g) for i, g in enumerate(grammars)])
    np.testing.assert_array_equal(parallel, serial)
    assert (parallel[:2] == -1).all() and (parallel[14:] == -1).all()  # other rows untouched
    assert all(0 < len(_allowed(parallel[i + 2])) < len(tok) for i in range(12))


def test_cached_compiles_are_independent_matchers(monkeypatch):
    tok = build_tokenizer()
    compiler = GrammarCompiler(tok, len(tok), [tok.eos_token_id])
    calls = []
    real = compiler._compile
    monkeypatch.setattr(compiler, "_compile", lambda so: calls.append(so) or real(so))
    a, b = compiler.compile(SO_KINDS[1]), compiler.compile(SO(choice=["one", "two", "three"]))
    assert len(calls) == 1  # one compile for equal constraints
    assert a.accept(tok.encode("one")) and a.terminated and not b.terminated  # own state
    monkeypatch.setattr(structured_output, "GRAMMAR_CACHE_SIZE", 2)
    for so in SO_KINDS:
        compiler.compile(so)
    assert len(compiler._cache) == 2


def test_forced_tokens_and_masks_after_drafts():
    """Speculative decoding: a JSON schema forces its opening key; the mask of a row after
    drafts is the mask of a grammar that took them, and the grammar itself does not move."""
    tok = build_tokenizer()
    compiler = GrammarCompiler(tok, len(tok), [tok.eos_token_id])
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    g = compiler.compile(SO(json=schema, disable_any_whitespace=True))
    forced = g.forced_tokens(16)
    assert tok.decode(forced) == '{"name":"' and g.forced_tokens(3) == forced[:3]
    words = -(-len(tok) // 32)
    mask = np.zeros((5, words), np.int32)
    fill_bitmasks(mask, [(0, g, ()), (1, g, forced[:1]), (2, g, forced[:4]), (3, g, forced),
                         (4, g, [forced[0], forced[0]])])  # the last: refused, unreachable
    for row, n in ((0, 0), (1, 1), (2, 4), (3, len(forced))):
        walked = g.copy()
        assert walked.accept(forced[:n])
        want = np.zeros((1, words), np.int32)
        walked.fill_bitmask(want, 0)
        np.testing.assert_array_equal(mask[row], want[0])
    assert (mask[4] == -1).all()
    assert _allowed(mask[0]).tolist() != _allowed(mask[3]).tolist()
    assert g.forced_tokens(16) == forced  # rolled back
    assert not g.terminated and g.accept(forced)
