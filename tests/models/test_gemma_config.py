"""Gemma configs read as transformers reads them, for what its saved configs may leave out
(the logits themselves are checked against transformers in test_hf_parity.py)."""

import pytest
import transformers

from jaxpage.models.gemma import GemmaConfig


def _hf(config) -> dict:
    return config.to_dict()


@pytest.mark.parametrize("model_type,pattern", [("gemma2", None), ("gemma3_text", 6),
                                                ("gemma3_text", 3)])
def test_default_sliding_layers_are_transformers(model_type, pattern):
    """A config without ``layer_types`` (older checkpoints) slides where transformers does."""
    cls = transformers.Gemma2Config if model_type == "gemma2" else transformers.Gemma3TextConfig
    extra = {} if pattern is None else dict(sliding_window_pattern=pattern)
    ref = cls(num_hidden_layers=12, sliding_window=7, **extra)
    hf = dict(_hf(ref), **extra)
    hf.pop("layer_types")
    windows = GemmaConfig.from_hf(hf).sliding_windows
    assert windows == tuple(7 if t == "sliding_attention" else None for t in ref.layer_types)
    assert None in windows and 7 in windows


def test_gemma3_rope_from_v4_and_v5_configs():
    v5 = GemmaConfig.from_hf(_hf(transformers.Gemma3TextConfig(
        rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0,
                                                rope_theta=1_000_000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10_000.0)})))
    assert (v5.rope.theta, v5.rope.rope_type, v5.rope.factor) == (1e6, "linear", 8.0)
    assert (v5.local_rope.theta, v5.local_rope.rope_type) == (1e4, "default")
    v4 = GemmaConfig.from_hf(dict(model_type="gemma3_text", vocab_size=8, hidden_size=8,
                                  intermediate_size=8, num_hidden_layers=2,
                                  num_attention_heads=2, rope_theta=1_000_000.0,
                                  rope_scaling=dict(rope_type="linear", factor=8.0),
                                  rope_local_base_freq=10_000.0))
    assert (v4.rope.theta, v4.rope.factor, v4.local_rope.theta) == (1e6, 8.0, 1e4)


def test_gemma1_has_no_gemma2_extras():
    hf = dict(_hf(transformers.GemmaConfig()), hidden_act="gelu")  # as old config.json files say
    cfg = GemmaConfig.from_hf(hf)
    assert cfg.hidden_act == "gelu_pytorch_tanh"  # the legacy "gelu" means the tanh form
    assert not cfg.sandwich_norms and cfg.attn_logit_softcapping is None
    assert cfg.final_logit_softcapping is None and cfg.query_pre_attn_scalar is None
    with pytest.raises(ValueError, match="Unsupported Gemma model_type 'gemma3'"):
        GemmaConfig.from_hf(dict(model_type="gemma3", vocab_size=8, hidden_size=8,
                                 intermediate_size=8, num_hidden_layers=2, num_attention_heads=2))
