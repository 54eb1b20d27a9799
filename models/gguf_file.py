"""Reading a GGUF (llama.cpp) file: an HF-style config, dequantized tensors, tokenizer metadata.

Weights are dequantized with the ``gguf`` package to float32 on the host, tensor by tensor, and
renamed to HF names (``weight_map.gguf_to_hf_name``) so the HF name tables apply unchanged.
The tokenizer itself is built by transformers from the same file (see ``loader.py``).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from jaxpage.models import weight_map

# GGUF general.architecture -> HF architectures name
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM"}


class GGUFCheckpoint:
    """Metadata of one GGUF file, read eagerly; tensors are dequantized lazily by ``tensors()``."""

    def __init__(self, path: str | os.PathLike):
        from gguf import GGUFReader  # lazy: only GGUF users pay for the import

        self.path = os.fspath(path)
        try:
            self._reader = GGUFReader(self.path)
        except Exception as e:  # a truncated or foreign file: say so plainly
            raise ValueError(f"Cannot read GGUF file {self.path!r}: {e}") from None
        self.arch = self._field("general.architecture")
        if self.arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"Unsupported GGUF architecture {self.arch!r}; jaxpage reads GGUF "
                             f"files of: {', '.join(GGUF_ARCHITECTURES)}.")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.hf_config = self._build_hf_config()

    def _field(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _arch_field(self, key: str, default: Any = None) -> Any:
        return self._field(f"{self.arch}.{key}", default)

    def _build_hf_config(self) -> dict[str, Any]:
        heads = int(self._arch_field("attention.head_count"))
        hidden = int(self._arch_field("embedding_length"))
        kv_heads = self._arch_field("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):
            raise ValueError("GGUF files with per-layer kv head counts are not supported.")
        embd = self._tensors["token_embd.weight"]
        name = str(self._field("general.name", "") or "").lower()
        arch_name = GGUF_ARCHITECTURES[self.arch]
        if self.arch == "llama" and "mistral" in name:
            arch_name = "MistralForCausalLM"
        hf: dict[str, Any] = {
            "architectures": [arch_name],
            "model_type": "mistral" if arch_name == "MistralForCausalLM" else self.arch,
            "hidden_size": hidden,
            "intermediate_size": int(self._arch_field("feed_forward_length")),
            "num_hidden_layers": int(self._arch_field("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "head_dim": int(self._arch_field("attention.key_length", hidden // heads)),
            "rms_norm_eps": float(self._arch_field("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self._arch_field("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._arch_field("context_length", 2048)),
            "vocab_size": int(embd.shape[-1]),  # GGUF shapes are (in, out): [D, V]
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
        }
        scaling = self._arch_field("rope.scaling.type")
        if scaling not in (None, "none"):
            hf["rope_scaling"] = {"rope_type": scaling,
                                  "factor": float(self._arch_field("rope.scaling.factor", 1.0))}
        if self.arch == "qwen2" and "blk.0.attn_q.bias" not in self._tensors:
            raise ValueError("Qwen2 GGUF without q/k/v biases is not supported.")
        return hf

    @property
    def has_tokenizer(self) -> bool:
        return "tokenizer.ggml.model" in self._reader.fields

    def build_tokenizer(self):
        """The file's tokenizer as a transformers fast tokenizer, built without torch.

        ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds the same tokenizer, but
        transformers 5 reads the file with a torch-based reader, and torch is not a jaxpage
        dependency. Here the metadata comes from the ``gguf`` package and transformers' own
        converter (``convert_gguf_tokenizer``) builds the tokenizer. Returns None when this
        transformers version lacks that converter (the caller then uses AutoTokenizer).
        """
        try:
            from transformers import PreTrainedTokenizerFast
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
        except ImportError:
            return None
        grouped = {group: {name: self._field(f"tokenizer.{key}") for key, name in renames.items()
                           if f"tokenizer.{key}" in self._reader.fields}
                   for group, renames in GGUF_TOKENIZER_MAPPING.items()}
        tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
        if tokenizer_dict.get("tokenizer_type") == "llama":  # llama.cpp's default for SentencePiece
            tokenizer_config.setdefault("add_bos_token", True)
        tokens = tokenizer_dict["tokens"]
        for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                          ("pad_token", "padding")):
            token_id = self._field(f"tokenizer.ggml.{key}_token_id")
            tokenizer_config[name] = tokens[token_id] if token_id is not None else None
        backend, extra = convert_gguf_tokenizer(self.arch, tokenizer_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)

    @property
    def chat_template(self) -> str | None:
        return self._field("tokenizer.chat_template")

    @property
    def eos_token_ids(self) -> list[int]:
        """EOS plus end-of-turn / end-of-message ids where the file names them (Llama 3 has both)."""
        ids = [self._field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    @property
    def rope_freq_divisors(self) -> tuple[float, ...] | None:
        """llama.cpp's ``rope_freqs`` (Llama 3.1 scaling baked into per-frequency divisors)."""
        t = self._tensors.get("rope_freqs.weight")
        return None if t is None else tuple(float(x) for x in self._dequantize(t).reshape(-1))

    @staticmethod
    def _dequantize(tensor) -> np.ndarray:
        from gguf.quants import dequantize

        # numpy layout (out, in), the same as torch's; GGUF's own shape field is reversed.
        return dequantize(tensor.data, tensor.tensor_type)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (HF name, float32 array in HF layout), one tensor at a time."""
        num_heads = self.hf_config["num_attention_heads"]
        num_kv_heads = self.hf_config["num_key_value_heads"]
        for name, tensor in self._tensors.items():
            if name == "rope_freqs.weight":  # folded into the config, see rope_freq_divisors
                continue
            weight = self._dequantize(tensor)
            if self.arch == "llama" and ".attn_q." in name:
                weight = weight_map.unpermute_gguf_qk(weight, num_heads)
            elif self.arch == "llama" and ".attn_k." in name:
                weight = weight_map.unpermute_gguf_qk(weight, num_kv_heads)
            yield weight_map.gguf_to_hf_name(name), weight
