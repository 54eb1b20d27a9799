"""Every architecture against HF transformers: tiny random models saved as safetensors.

For each variant a tiny HF model (2 layers, small dims, GQA where the family has it) gets random
weights, is saved with ``save_pretrained`` and loaded by jaxpage. Its prompts run as one ragged,
chunked-prefill batch over a NaN-poisoned pool with shuffled pages (``paged_harness``), then 32
greedy tokens per request decode together, one token per request per step. Checks:

  * float32 logits of every prompt token and every decode step: ``rtol=1e-4, atol=1e-5``
    (atol covers logits near zero, where a relative bound alone means nothing; observed max
    abs error is ~1e-6 on logits of magnitude ~1);
  * 32 greedy tokens identical to HF's greedy continuation (full recompute each step).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import transformers

from jaxpage.models.loader import load_model
from tests.models.paged_harness import PagedRunner, prefill_and_decode

VOCAB = 256
NUM_DECODE = 32
# Lengths hit the page edges for page_size 4: 1, S-1, S, S+1, and longer ones.
PROMPT_LENS = (1, 3, 4, 5, 11, 17)
# Chunked prefill: request 5 (17 tokens) is split across both steps, mixed with whole prompts.
PREFILL_STEPS = [{0: 1, 1: 3, 2: 4, 5: 9}, {3: 5, 4: 11, 5: 8}]

_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=128,
               initializer_range=0.05)
_LLAMA_DIMS = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)

VARIANTS = {
    # Llama 3.1: GQA 4/2 and llama3 rope scaling (original context 16 so all three bands occur).
    "llama3": ("LlamaConfig", dict(_LLAMA_DIMS, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    # Llama 2 style MHA, with the optional attention and MLP biases.
    "llama2_bias": ("LlamaConfig", dict(_LLAMA_DIMS, num_key_value_heads=4, attention_bias=True,
                                        mlp_bias=True)),
    # SmolLM2: tied embeddings, 3 query heads per kv head.
    "smollm2": ("LlamaConfig", dict(hidden_size=48, intermediate_size=64, num_attention_heads=6,
                                    num_key_value_heads=2, tie_word_embeddings=True)),
    # Mistral: multi-query (4/1) and a sliding window shorter than most prompts.
    "mistral": ("MistralConfig", dict(_LLAMA_DIMS, num_key_value_heads=1, sliding_window=6)),
    # Qwen2: qkv bias; the second layer slides (max_window_layers=1).
    "qwen2": ("Qwen2Config", dict(_LLAMA_DIMS, use_sliding_window=True, sliding_window=5,
                                  max_window_layers=1)),
    # Qwen3: q/k RMSNorm and head_dim (32) != hidden_size / heads (16).
    "qwen3": ("Qwen3Config", dict(_LLAMA_DIMS, head_dim=32)),
    # OPT-125m layout (pre-LN) and OPT-350m layout (post-LN, word_embed_proj_dim != hidden).
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=64)),
    "opt350m": ("OPTConfig", dict(hidden_size=64, ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=32,
                                  do_layer_norm_before=False)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_head=4, n_layer=2, n_positions=128)),
    # Gemma: (1 + w) norms, sqrt(D)-scaled embeddings, tanh-gelu MLP, head_dim 32 != D / N.
    "gemma": ("GemmaConfig", dict(_LLAMA_DIMS, head_dim=32, hidden_act="gelu_pytorch_tanh")),
    # Gemma 2: four norms a layer, scores scaled by query_pre_attn_scalar and tanh-capped, capped
    # final logits, the first layer sliding. Caps small enough to bite on random weights.
    "gemma2": ("Gemma2Config", dict(_LLAMA_DIMS, head_dim=16, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=0.5, final_logit_softcapping=2.0,
                                    sliding_window=5)),
    # Gemma 3 (text): q/k norms; the first layer slides with its own rope base, the second is
    # global with linear rope scaling.
    "gemma3": ("Gemma3TextConfig", dict(_LLAMA_DIMS, head_dim=16, query_pre_attn_scalar=24,
                                        sliding_window=5, layer_types=["sliding_attention",
                                                                       "full_attention"],
                                        rope_parameters={
                                            "full_attention": dict(rope_type="linear", factor=2.0,
                                                                   rope_theta=1_000_000.0),
                                            "sliding_attention": dict(rope_type="default",
                                                                      rope_theta=10_000.0)})),
}


def build_hf_model(variant: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_name, kwargs = VARIANTS[variant]
    config_cls = getattr(transformers, config_name)
    config = config_cls(**{**_COMMON, **kwargs, **overrides})
    if config_name == "GPT2Config":
        config.initializer_range = 0.05
        config.bos_token_id = config.eos_token_id = 0  # keep ids inside the tiny vocab
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: perturb all so the map is tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_hf_model(model, path) -> None:
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(path, **kwargs)
    assert list(path.glob("*.safetensors")), "expected a safetensors checkpoint"


@torch.no_grad()
def hf_greedy(model, prompt: list[int], num_tokens: int):
    """(prompt logits (len, V), greedy tokens, per-step logits (num_tokens, V)), full recompute."""
    seq = list(prompt)
    prompt_logits, tokens, step_logits = None, [], []
    for _ in range(num_tokens):
        logits = model(torch.tensor([seq])).logits[0].float().numpy()  # (len, V)
        if prompt_logits is None:
            prompt_logits = logits
        step_logits.append(logits[-1])
        tokens.append(int(np.argmax(logits[-1])))
        seq.append(tokens[-1])
    return prompt_logits, tokens, np.stack(step_logits)


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENS]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_match_hf(variant, tmp_path):
    hf_model = build_hf_model(variant)
    save_hf_model(hf_model, tmp_path)
    loaded = load_model(tmp_path, dtype="float32")
    assert loaded.architecture == hf_model.config.architectures[0]

    prompts = make_prompts()
    runner = PagedRunner(loaded.model, page_size=4, num_pages=160, max_num_tokens=32,
                         max_num_seqs=8, max_pages_per_seq=16)
    jax_prompt_logits, jax_tokens, jax_step_logits = prefill_and_decode(
        runner, prompts, PREFILL_STEPS, NUM_DECODE)

    for i, prompt in enumerate(prompts):
        hf_prompt_logits, hf_tokens, hf_step_logits = hf_greedy(hf_model, prompt, NUM_DECODE)
        np.testing.assert_allclose(jax_prompt_logits[i], hf_prompt_logits, rtol=1e-4, atol=1e-5,
                                   err_msg=f"{variant}: prompt logits of request {i}")
        assert jax_tokens[i] == hf_tokens, f"{variant}: greedy tokens of request {i} differ"
        np.testing.assert_allclose(jax_step_logits[i], hf_step_logits, rtol=1e-4, atol=1e-5,
                                   err_msg=f"{variant}: decode logits of request {i}")


def test_generation_config_and_tokenizer_are_loaded(tmp_path):
    """eos ids merge generation_config.json, config.json and the tokenizer; chat template kept."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf_model = build_hf_model("smollm2")
    hf_model.generation_config.eos_token_id = [2, 7]
    hf_model.generation_config.temperature = 0.6
    hf_model.generation_config.do_sample = True
    save_hf_model(hf_model, tmp_path)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w9", unk_token="w0")
    hf_tok.chat_template = template
    hf_tok.save_pretrained(tmp_path)

    loaded = load_model(tmp_path, dtype="float32")
    assert loaded.tokenizer is not None
    assert loaded.tokenizer("w5 w6").input_ids == [5, 6]
    assert loaded.chat_template == template
    assert loaded.generation_config["temperature"] == 0.6
    assert loaded.eos_token_ids == [2, 7, 9]
    assert loaded.max_model_len == 128
    assert loaded.config.vocab_size == VOCAB
