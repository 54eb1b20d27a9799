"""HF ``architectures`` names -> (config class, model class)."""

from __future__ import annotations

from typing import Any

from jaxpage.models.gemma import GemmaConfig, GemmaForCausalLM
from jaxpage.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jaxpage.models.llama import LlamaConfig, LlamaForCausalLM
from jaxpage.models.opt import OPTConfig, OPTForCausalLM

# name -> (config class, model class, weight-map family used by the loader); Gemma's
# checkpoints use Llama's tensor names (plus Gemma 2 / 3's extra norms).
_MODELS: dict[str, tuple[type, type, str]] = {
    "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM, "llama"),
    "MistralForCausalLM": (LlamaConfig, LlamaForCausalLM, "llama"),
    "Qwen2ForCausalLM": (LlamaConfig, LlamaForCausalLM, "llama"),
    "Qwen3ForCausalLM": (LlamaConfig, LlamaForCausalLM, "llama"),
    "GemmaForCausalLM": (GemmaConfig, GemmaForCausalLM, "llama"),
    "Gemma2ForCausalLM": (GemmaConfig, GemmaForCausalLM, "llama"),
    "Gemma3ForCausalLM": (GemmaConfig, GemmaForCausalLM, "llama"),
    "OPTForCausalLM": (OPTConfig, OPTForCausalLM, "opt"),
    "GPT2LMHeadModel": (GPT2Config, GPT2LMHeadModel, "gpt2"),
}

# Configs without ``architectures`` (rare; e.g. hand-written dicts) fall back on model_type.
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM",
                "opt": "OPTForCausalLM", "gpt2": "GPT2LMHeadModel"}

SUPPORTED_ARCHITECTURES = tuple(_MODELS)


def resolve_architecture(hf_config: dict[str, Any]) -> str:
    """The first supported name in ``hf_config["architectures"]`` (or from ``model_type``).

    Raises:
        ValueError: nothing in the config is supported; the message lists what is.
    """
    names = list(hf_config.get("architectures") or [])
    for name in names:
        if name in _MODELS:
            return name
    if not names and hf_config.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[hf_config["model_type"]]
    got = names or hf_config.get("model_type") or "none given"
    raise ValueError(f"Unsupported model architecture {got}; jaxpage supports: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}.")


def get_model_classes(architecture: str) -> tuple[type, type, str]:
    """(config class, model class, weight-map family) for a supported architecture name."""
    if architecture not in _MODELS:
        raise ValueError(f"Unsupported model architecture {architecture!r}; jaxpage supports: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
    return _MODELS[architecture]
