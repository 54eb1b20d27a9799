"""Loader: bad inputs give clear errors, dummy weights, dtypes, and GGUF files written here."""

from __future__ import annotations

import json
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from jaxpage.models import registry
from jaxpage.models.layers import RopeConfig, rope_inv_freq
from jaxpage.models.loader import load_model
from jaxpage.models.weight_map import unpermute_gguf_qk
from tests.models.paged_harness import PagedRunner, prefill_and_decode
from tests.models.test_hf_parity import build_hf_model, hf_greedy, save_hf_model

TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128,
                  hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, eos_token_id=2)


# ---------------------------------------------------------------------------------- bad input

def test_unknown_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("/no/such/model/dir")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="No config.json"):
        load_model(tmp_path)


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    with pytest.raises(FileNotFoundError, match=r"No \*.safetensors"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"],
                                                      "model_type": "bert"}))
    save_file({"x": np.zeros(1, np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="Unsupported model architecture.*BertForMaskedLM.*LlamaForCausalLM"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="supports: LlamaForCausalLM"):
        registry.resolve_architecture({})


class _Planted:
    """Unpickling this would create a file: proof that the loader never unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("as_file", [False, True])
def test_pickle_checkpoint_is_refused(tmp_path, as_file):
    marker = tmp_path / "unpickled"
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Planted(marker), f)
    target = tmp_path / "pytorch_model.bin" if as_file else tmp_path
    with pytest.raises(ValueError, match="Refusing to load pickle checkpoint.*no torch.load"):
        load_model(target)
    assert not marker.exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(None, dtype="float64", load_format="dummy", hf_config=TINY_LLAMA)
    with pytest.raises(ValueError, match="load_format must be one of"):
        load_model(tmp_path, load_format="pt")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="Unsupported model file"):
        load_model(tmp_path / "weights.txt")
    with pytest.raises(ValueError, match="model_path is required"):
        load_model(None)


def test_incomplete_and_foreign_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    save_file({"model.embed_tokens.weight": np.zeros((128, 32), np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks \d+ parameter\(s\), e.g. layers.0"):
        load_model(tmp_path)
    save_file({"model.vision_tower.weight": np.zeros(3, np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="Unexpected checkpoint tensor 'model.vision_tower.weight'"):
        load_model(tmp_path)
    save_file({"model.embed_tokens.weight": np.zeros((100, 32), np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not fit parameter embed_tokens"):
        load_model(tmp_path)


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="Unsupported GGUF architecture 'bert'"):
        load_model(tmp_path / "m.gguf")
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="Cannot read GGUF file"):
        load_model(tmp_path / "broken.gguf")


# ---------------------------------------------------------------------------------- dummy, dtypes

@pytest.mark.parametrize("dtype,jdtype", [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)])
def test_dummy_weights_from_config_dict(dtype, jdtype):
    loaded = load_model(None, load_format="dummy", hf_config=TINY_LLAMA, dtype=dtype, seed=3)
    leaves = jax.tree.leaves(nnx.state(loaded.model))
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jdtype)}
    assert loaded.tokenizer is None and loaded.eos_token_ids == [2] and loaded.max_model_len == 64
    runner = PagedRunner(loaded.model, kv_dtype=jdtype)
    _, tokens, _ = prefill_and_decode(runner, [[1, 2, 3], [4]], [{0: 3, 1: 1}], 3)
    assert all(0 <= t < 128 for seq in tokens for t in seq)
    again = load_model(None, load_format="dummy", hf_config=TINY_LLAMA, dtype=dtype, seed=3)
    np.testing.assert_array_equal(np.asarray(again.model.embed_tokens[...], np.float32),
                                  np.asarray(loaded.model.embed_tokens[...], np.float32))


def test_dummy_from_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    assert load_model(tmp_path, load_format="dummy").config.num_hidden_layers == 2


def test_bfloat16_load_tracks_float32(tmp_path):
    """bf16 compute from an f32 checkpoint, and an f32 model from a bf16 checkpoint."""
    hf_model = build_hf_model("qwen2")
    save_hf_model(hf_model, tmp_path / "f32")
    save_hf_model(hf_model.to(torch.bfloat16), tmp_path / "bf16")
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    logits = {}
    for ckpt, dtype in (("f32", "float32"), ("f32", "bfloat16"), ("bf16", "float32")):
        loaded = load_model(tmp_path / ckpt, dtype=dtype)
        assert loaded.model.layers[0].self_attn.q_proj[...].dtype == jnp.dtype(dtype)
        runner = PagedRunner(loaded.model, kv_dtype=jnp.dtype(dtype))
        logits[ckpt, dtype], _, _ = prefill_and_decode(runner, prompts, [{0: 5, 1: 2}], 1)
    for i in range(len(prompts)):
        np.testing.assert_allclose(logits["f32", "bfloat16"][i], logits["f32", "float32"][i], atol=0.1)
        np.testing.assert_allclose(logits["bf16", "float32"][i], logits["f32", "float32"][i], atol=0.1)


# ---------------------------------------------------------------------------------- GGUF written here

def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's ``permute``: HF half-split rows -> llama.cpp interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).normal(size=(3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_gguf_qk(_llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(_llama_cpp_permute(w, 3), w)


def test_rope_freq_divisors_equal_llama3_scaling():
    """GGUF's rope_freqs (llama.cpp's rope factors) reproduce HF's llama3 frequencies."""
    llama3 = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=16)
    divisors = tuple(_llama_cpp_rope_factors(llama3, 16))
    np.testing.assert_allclose(rope_inv_freq(RopeConfig(theta=500000.0, freq_divisors=divisors), 16),
                               rope_inv_freq(llama3, 16), rtol=1e-6)


def _llama_cpp_rope_factors(rope: RopeConfig, head_dim: int) -> list[float]:
    """convert_hf_to_gguf.py's Llama 3.1 ``rope_freqs`` tensor."""
    base = rope_inv_freq(RopeConfig(theta=rope.theta), head_dim)
    low = rope.original_max_position_embeddings / rope.low_freq_factor
    high = rope.original_max_position_embeddings / rope.high_freq_factor
    out = []
    for freq in base:
        wavelen = 2 * math.pi / freq
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(rope.factor)
        else:
            smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
                rope.high_freq_factor - rope.low_freq_factor)
            out.append(1 / ((1 - smooth) / rope.factor + smooth))
    return out


_HF_TO_GGUF = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
               "self_attn.v_proj.bias": "attn_v.bias",
               "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
               "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
               "mlp.down_proj.weight": "ffn_down.weight"}


def write_gguf(hf_model, path, arch: str) -> None:
    """Writes an HF llama/qwen2/qwen3 model as llama.cpp would (F32, Q/K permuted for llama)."""
    import gguf

    cfg = hf_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if cfg.rope_parameters.get("rope_type") == "llama3":
        rope = RopeConfig.from_hf(cfg.to_dict())
        w.add_tensor("rope_freqs.weight", np.asarray(_llama_cpp_rope_factors(rope, head_dim), np.float32))
    for name, t in hf_model.state_dict().items():
        a = t.numpy().astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            a = _llama_cpp_permute(a, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            a = _llama_cpp_permute(a, cfg.num_key_value_heads)
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{_HF_TO_GGUF[rest]}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if gname == "output.weight" and cfg.tie_word_embeddings:
            continue
        w.add_tensor(gname, a)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.mark.parametrize("variant,arch", [("llama3", "llama"), ("smollm2", "llama"), ("qwen2", "qwen2"),
                                          ("qwen3", "qwen3")])
def test_gguf_written_here_matches_hf(variant, arch, tmp_path):
    """Q/K un-permutation, name map, tied-embedding detection, and Llama 3.1's rope_freqs."""
    # GGUF files carry no sliding window: test Qwen2's dense layers here.
    hf_model = build_hf_model(variant, **({"use_sliding_window": False} if variant == "qwen2" else {}))
    write_gguf(hf_model, tmp_path / "tiny.gguf", arch)
    loaded = load_model(tmp_path / "tiny.gguf")
    assert loaded.tokenizer is None  # no tokenizer metadata in this file
    assert loaded.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7]]
    runner = PagedRunner(loaded.model)
    jax_logits, jax_tokens, _ = prefill_and_decode(runner, prompts, [{0: 11, 1: 2}], 8)
    for i, prompt in enumerate(prompts):
        hf_logits, hf_tokens, _ = hf_greedy(hf_model, prompt, 8)
        np.testing.assert_allclose(jax_logits[i], hf_logits, rtol=1e-4, atol=1e-5)
        assert jax_tokens[i] == hf_tokens

