import pytest

from jaxpage.engine.detokenizer import IncrementalDetokenizer, TokenizerInfo, check_stop_strings
from jaxpage.sampling_params import SamplingParams

CORPUS = ["Hello world, this is a tiny corpus for a tiny tokenizer.",
          "The quick brown fox jumps over the lazy dog."] * 20


def build_tokenizer():
    """A byte-level BPE trained in-test: multi-byte characters split across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>", "<|sep|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                   additional_special_tokens=["<|sep|>"])


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def stream(tok, prompt: str, output_ids: list[int], stop_terminated=False, **params):
    """Feeds tokens one at a time; returns (detokenizer, reported texts, stop string)."""
    detok = IncrementalDetokenizer(TokenizerInfo(tok), tok.encode(prompt), SamplingParams(**params))
    texts, stop = [], None
    for i, t in enumerate(output_ids):
        last = i == len(output_ids) - 1
        stop = detok.update([t], stop_terminated and last)
        texts.append(detok.get_output_text(finished=last or stop is not None))
        if stop is not None:
            break
    return detok, texts, stop


@pytest.mark.parametrize("text", [
    "Hello world, the quick brown fox.",
    "héllo wörld — naïve café",
    "日本語のテキスト and 🙂🙃 emoji",
    "   spaces\tand\nnewlines  ",
])
def test_streamed_text_equals_full_decode(tok, text):
    ids = tok.encode(text)
    _, texts, _ = stream(tok, "Prompt: ", ids)
    assert texts[-1] == tok.decode(ids, skip_special_tokens=True) == text
    for earlier, later in zip(texts, texts[1:]):
        assert later.startswith(earlier)  # streamed text is never retracted
    assert not any("\ufffd" in t for t in texts)


def test_multibyte_character_waits_for_its_last_byte(tok):
    ids = tok.encode("a🙂")
    assert len(ids) >= 4  # the emoji is four byte tokens in this tiny vocabulary
    _, texts, _ = stream(tok, "x", ids)
    assert texts[0] == "a" and texts[-2] == "a" and texts[-1] == "a🙂"


def test_stop_string_across_token_boundaries(tok):
    ids = tok.encode("Hello world, the quick brown fox")
    detok, texts, stop = stream(tok, "", ids, stop=["ld, the"])
    assert stop == "ld, the" and texts[-1] == "Hello wor"
    # While running, the buffer holds back len(stop) - 1 characters: no partial stop string leaks.
    assert all("Hello wor".startswith(t) for t in texts)
    _, texts, stop = stream(tok, "", ids, stop=["ld, the"], include_stop_str_in_output=True)
    assert stop == "ld, the" and texts[-1] == "Hello world, the"


def test_earliest_stop_string_wins(tok):
    ids = tok.encode("The quick brown fox jumps")
    _, texts, stop = stream(tok, "", ids, stop=["fox", "quick", "The quick brown fox"])
    assert stop == "quick" and texts[-1] == "The "


def test_stop_token_text_is_dropped_unless_included(tok):
    ids = tok.encode("Hello world")
    sep = tok.convert_tokens_to_ids("<|sep|>")
    _, texts, _ = stream(tok, "", ids + [sep], stop_terminated=True, skip_special_tokens=False)
    assert texts[-1] == "Hello world"
    _, texts, _ = stream(tok, "", ids + [sep], stop_terminated=True, skip_special_tokens=False,
                         include_stop_str_in_output=True)
    assert texts[-1] == "Hello world<|sep|>"


def test_skip_special_tokens(tok):
    ids = tok.encode("Hello<|sep|> world")
    assert tok.convert_tokens_to_ids("<|sep|>") in ids
    assert stream(tok, "", ids)[1][-1] == "Hello world"
    assert stream(tok, "", ids, skip_special_tokens=False)[1][-1] == "Hello<|sep|> world"


def test_prompt_tail_is_decoding_context(tok):
    prompt_ids = tok.encode("Hello")
    detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams())  # a raw tokenizer works too
    assert detok.tokens == tok.convert_ids_to_tokens(prompt_ids)
    for t in tok.encode(" world"):
        detok.update([t], False)
    assert detok.output_text == " world"


class SlowTokenizer:
    """Minimal slow-tokenizer stand-in: added tokens are decoded apart from the rest."""

    is_fast = False
    vocab = ["a", "b", "c", "<sep>"]
    all_special_tokens = ["<sep>"]

    def get_added_vocab(self):
        return {"<sep>": 3}

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        return [self.vocab[i] for i in ids
                if not (skip_special_tokens and self.vocab[i] in self.all_special_tokens)]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)


@pytest.mark.parametrize("skip, spaces, expected", [
    (False, True, "ab <sep> c"), (False, False, "ab<sep>c"), (True, True, "abc")])
def test_added_tokens_of_slow_tokenizers(skip, spaces, expected):
    info = TokenizerInfo(SlowTokenizer())
    assert info.tokens_to_string(["a", "b", "<sep>", "c"], skip, spaces) == expected
    detok = IncrementalDetokenizer(info, [2], SamplingParams(
        skip_special_tokens=skip, spaces_between_special_tokens=spaces))
    for t in (0, 1, 3, 2):
        detok.update([t], False)
    assert detok.output_text == expected


def test_without_a_tokenizer_there_is_no_text():
    detok = IncrementalDetokenizer(None, [1, 2], SamplingParams())
    assert detok.update([5, 6], False) is None and detok.get_output_text(True) == ""


def test_check_stop_strings():
    assert check_stop_strings("abcdef", 2, ["cd"], False) is None  # match ends before new text
    assert check_stop_strings("abcdef", 3, ["de"], False) == ("de", 3)
    assert check_stop_strings("abcdef", 3, ["de"], True) == ("de", 5)
    assert check_stop_strings("abcdef", 1, ["ef"], True) == ("ef", -1)
    assert check_stop_strings("abcdef", 0, ["ef"], False) is None
    assert check_stop_strings("abcdef", 6, ["f", "b"], False) == ("b", 1)
