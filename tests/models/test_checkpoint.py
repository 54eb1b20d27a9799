"""``jaxpage convert`` checkpoints: the converted model is the source's, parameter for parameter,
with its rope factors, tokenizer, chat template and eos ids; bad checkpoints are clear errors."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage.models import checkpoint
from jaxpage.models.checkpoint import convert
from jaxpage.models.loader import load_model
from tests.models.paged_harness import PagedRunner, prefill_and_decode
from tests.models.test_hf_parity import build_hf_model, save_hf_model
from tests.models.test_loader import write_gguf


def _params(loaded) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.get_value()) for k, v in checkpoint._flat_params(loaded.model).items()}


def _assert_same_params(a, b) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys() and len(pa) > 5
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and pa[k].shape == pb[k].shape, k
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_gguf_with_rope_factors_round_trips(tmp_path):
    """A Llama 3.1 GGUF (Q/K permuted, rope_freqs folded into the config): the checkpoint's
    parameters, rope factors and greedy tokens are the GGUF's, and a load in another dtype
    casts on restore."""
    hf_model = build_hf_model("llama3")
    write_gguf(hf_model, tmp_path / "tiny.gguf", "llama")
    src = load_model(tmp_path / "tiny.gguf", dtype="float32")
    assert src.config.rope.freq_divisors is not None  # the case this test is about
    out = convert(tmp_path / "tiny.gguf", tmp_path / "ck", dtype="float32")
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    assert meta["dtype"] == "float32" and meta["architecture"] == "LlamaForCausalLM"
    loaded = load_model(out, dtype="float32")
    assert loaded.config == src.config and loaded.eos_token_ids == src.eos_token_ids
    _assert_same_params(src, loaded)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7]]
    ref_logits, ref_tokens, _ = prefill_and_decode(PagedRunner(src.model), prompts,
                                                   [{0: 11, 1: 2}], 6)
    logits, tokens, _ = prefill_and_decode(PagedRunner(loaded.model), prompts, [{0: 11, 1: 2}], 6)
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits):
        np.testing.assert_array_equal(a, b)
    bf16 = load_model(out, dtype="bfloat16")
    assert bf16.model.layers[0].mlp.up_proj[...].dtype == jnp.bfloat16
    _assert_same_params(load_model(tmp_path / "tiny.gguf", dtype="bfloat16"), bf16)


def test_bfloat16_checkpoint_of_hf_directory(tmp_path):
    """Stored in bfloat16 (the default): exactly what loading the source in bfloat16 gives,
    and a float32 load of it is the same values, upcast."""
    hf_model = build_hf_model("qwen3")
    save_hf_model(hf_model, tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    out = convert(tmp_path / "hf", tmp_path / "ck")
    assert not (out / "model.safetensors").exists() and (out / "params").is_dir()
    src = load_model(tmp_path / "hf", dtype="bfloat16")
    _assert_same_params(src, load_model(out, dtype="bfloat16"))
    f32 = load_model(out, dtype="float32")
    assert f32.generation_config == {"temperature": 0.6}
    for k, v in _params(src).items():
        np.testing.assert_array_equal(v.astype(np.float32), _params(f32)[k], err_msg=k)


def test_smollm2_checkpoint_keeps_tokenizer_and_template(smollm2_gguf, tmp_path):
    """The real model: parameters, tokenizer ids, chat template and eos ids survive."""
    out = convert(smollm2_gguf, tmp_path / "smol", dtype="float32")
    src, loaded = load_model(smollm2_gguf), load_model(out)
    _assert_same_params(src, loaded)
    assert loaded.chat_template == src.chat_template and "im_start" in loaded.chat_template
    assert loaded.eos_token_ids == src.eos_token_ids
    text = "Hello, <|im_start|>user ünïcödé 12345\n\tcode()"
    assert loaded.tokenizer(text)["input_ids"] == src.tokenizer(text)["input_ids"]
    assert loaded.tokenizer.decode(src.tokenizer(text)["input_ids"]) == text


def test_bad_checkpoints_are_clear_errors(tmp_path):
    hf_model = build_hf_model("qwen2", use_sliding_window=False)
    save_hf_model(hf_model, tmp_path / "hf")
    with pytest.raises(ValueError, match="not a jaxpage checkpoint"):
        load_model(tmp_path / "hf", load_format="orbax")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(ValueError, match="not an empty directory"):
        convert(tmp_path / "hf", tmp_path / "busy")
    out = convert(tmp_path / "hf", tmp_path / "ck", dtype="float32")
    with pytest.raises(ValueError, match="jaxpage checkpoint already"):
        convert(out, tmp_path / "again")

    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, intermediate_size=40)))
    with pytest.raises(ValueError, match=r"does not fit the model.*shape: layers\.0\.mlp"):
        load_model(out)
    layers = dict(config, num_hidden_layers=3)
    with pytest.raises(ValueError, match="layer_types names 2 layers but num_hidden_layers is 3"):
        (out / "config.json").write_text(json.dumps(layers))
        load_model(out)
    (out / "config.json").write_text(json.dumps(dict(layers, layer_types=["full_attention"] * 3)))
    with pytest.raises(ValueError, match=r"does not fit the model.*missing: layers\.2\."):
        load_model(out)
    (out / "config.json").write_text(json.dumps(config))
    assert load_model(out).config.num_hidden_layers == config["num_hidden_layers"]

    meta = json.loads((out / checkpoint.META_FILE).read_text())
    (out / checkpoint.META_FILE).write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(ValueError, match="format 99.*Convert the source again"):
        load_model(out)
    (out / checkpoint.META_FILE).write_text(json.dumps(meta))
    (out / "params").rename(out / "moved")
    with pytest.raises(FileNotFoundError, match="weights are missing"):
        load_model(out)


def test_interrupted_convert_leaves_nothing(tmp_path, monkeypatch):
    """A failure while writing removes the half-written directory: no checkpoint without
    its metadata file is ever left to be mistaken for one."""
    hf_model = build_hf_model("gpt2")
    save_hf_model(hf_model, tmp_path / "hf")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        convert(tmp_path / "hf", tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
