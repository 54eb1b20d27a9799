"""Checkpoint tensor names -> jaxpage parameter paths, and the layout change on the way.

The loader's name tables: every checkpoint quirk lives here (prefixes, torch ``Linear`` being
``(out, in)``, GPT-2's fused ``Conv1D`` ``c_attn``, GGUF names and llama.cpp's Q/K row permutation),
so the models' ``__call__`` never sees one. Target layouts are in ``GLOSSARY.md``.

Transforms (``target`` is the parameter's shape, known from the abstract model):
    "id"     reshape to target                       (embeddings, norms, biases, Conv1D weights)
    "T"      transpose, then reshape to target        (torch Linear (out, in) -> (in, ...))
    "split"  split the last axis in three, reshape    (GPT-2 c_attn -> q, k, v)
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

Path = tuple[str | int, ...]
# (regex on the prefix-stripped name, target path template(s), transform)
Rule = tuple[str, tuple[str, ...], str]

LLAMA_RULES: list[Rule] = [
    (r"embed_tokens\.weight", ("embed_tokens",), "id"),
    (r"norm\.weight", ("norm.weight",), "id"),
    (r"lm_head\.weight", ("lm_head",), "id"),
    (r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
     r"post_feedforward_layernorm)\.weight", ("layers.{0}.{1}.weight",), "id"),
    (r"layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight", ("layers.{0}.self_attn.{1}_proj",), "T"),
    (r"layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.bias", ("layers.{0}.self_attn.{1}_bias",), "id"),
    (r"layers\.(\d+)\.self_attn\.(q|k)_norm\.weight", ("layers.{0}.self_attn.{1}_norm.weight",), "id"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", ("layers.{0}.mlp.{1}_proj",), "T"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.bias", ("layers.{0}.mlp.{1}_bias",), "id"),
]

OPT_RULES: list[Rule] = [
    (r"embed_tokens\.weight", ("embed_tokens",), "id"),
    (r"embed_positions\.weight", ("embed_positions",), "id"),
    (r"project_(in|out)\.weight", ("project_{0}",), "T"),
    (r"final_layer_norm\.(weight|bias)", ("final_layer_norm.{0}",), "id"),
    (r"lm_head\.weight", ("lm_head",), "id"),
    (r"layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.weight", ("layers.{0}.{1}_proj",), "T"),
    (r"layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.bias", ("layers.{0}.{1}_bias",), "id"),
    (r"layers\.(\d+)\.(self_attn_layer_norm|final_layer_norm)\.(weight|bias)", ("layers.{0}.{1}.{2}",), "id"),
    (r"layers\.(\d+)\.(fc1|fc2)\.weight", ("layers.{0}.{1}",), "T"),
    (r"layers\.(\d+)\.(fc1|fc2)\.bias", ("layers.{0}.{1}_bias",), "id"),
]

GPT2_RULES: list[Rule] = [
    (r"(wte|wpe)\.weight", ("{0}",), "id"),
    (r"ln_f\.(weight|bias)", ("ln_f.{0}",), "id"),
    (r"lm_head\.weight", ("lm_head",), "id"),
    (r"h\.(\d+)\.(ln_1|ln_2)\.(weight|bias)", ("layers.{0}.{1}.{2}",), "id"),
    (r"h\.(\d+)\.attn\.c_attn\.weight", ("layers.{0}.q_proj", "layers.{0}.k_proj", "layers.{0}.v_proj"), "split"),
    (r"h\.(\d+)\.attn\.c_attn\.bias", ("layers.{0}.q_bias", "layers.{0}.k_bias", "layers.{0}.v_bias"), "split"),
    (r"h\.(\d+)\.attn\.c_proj\.weight", ("layers.{0}.o_proj",), "id"),
    (r"h\.(\d+)\.attn\.c_proj\.bias", ("layers.{0}.o_bias",), "id"),
    (r"h\.(\d+)\.mlp\.c_fc\.weight", ("layers.{0}.fc",), "id"),
    (r"h\.(\d+)\.mlp\.c_fc\.bias", ("layers.{0}.fc_bias",), "id"),
    (r"h\.(\d+)\.mlp\.c_proj\.weight", ("layers.{0}.proj",), "id"),
    (r"h\.(\d+)\.mlp\.c_proj\.bias", ("layers.{0}.proj_bias",), "id"),
]

# family -> (name prefixes to strip (first match wins), rules, names to ignore)
FAMILIES: dict[str, tuple[tuple[str, ...], list[Rule], str]] = {
    "llama": (("model.",), LLAMA_RULES, r".*rotary_emb\.inv_freq"),
    "opt": (("model.decoder.", "decoder.", "model."), OPT_RULES, r"$^"),
    # attn.bias / attn.masked_bias are causal-mask buffers in old GPT-2 checkpoints.
    "gpt2": (("transformer.",), GPT2_RULES, r"h\.\d+\.attn\.(masked_)?bias"),
}

_COMPILED = {fam: [(re.compile(rx), targets, tf) for rx, targets, tf in rules]
             for fam, (_, rules, _) in FAMILIES.items()}


def _to_path(template: str, groups: tuple[str, ...]) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in template.format(*groups).split("."))


def convert(family: str, name: str, weight: np.ndarray,
            target_shape: Callable[[Path], tuple[int, ...] | None]) -> list[tuple[Path, np.ndarray]]:
    """Maps one checkpoint tensor to (parameter path, array in the parameter's layout) pairs.

    Args:
        family: "llama" | "opt" | "gpt2" (from the registry).
        name: the checkpoint's tensor name.
        weight: the tensor, in the checkpoint's layout.
        target_shape: path -> the parameter's shape, or None if the model has no such parameter
            (e.g. ``lm_head`` of a tied model: that tensor is then skipped).

    Returns:
        The pairs to assign; empty for tensors that carry nothing the model needs.

    Raises:
        ValueError: a tensor no rule knows, or a shape that does not fit its parameter.
    """
    prefixes, _, ignore = FAMILIES[family]
    stripped = next((name[len(p):] for p in prefixes if name.startswith(p)), name)
    if re.fullmatch(ignore, stripped):
        return []
    for rx, templates, transform in _COMPILED[family]:
        m = rx.fullmatch(stripped)
        if m is None:
            continue
        paths = [_to_path(t, m.groups()) for t in templates]
        shapes = [target_shape(p) for p in paths]
        if any(s is None for s in shapes):
            if stripped == "lm_head.weight":  # tied embeddings: the copy is redundant
                return []
            raise ValueError(f"Checkpoint tensor {name!r} has no matching parameter {paths}.")
        parts = np.split(weight, len(paths), axis=-1) if transform == "split" else [weight]
        out = []
        for path, shape, part in zip(paths, shapes, parts):
            arr = part.T if transform == "T" else part
            if arr.size != int(np.prod(shape)):
                raise ValueError(f"Checkpoint tensor {name!r} of shape {weight.shape} does not fit "
                                 f"parameter {'.'.join(map(str, path))} of shape {shape}.")
            out.append((path, np.ascontiguousarray(arr).reshape(shape)))
        return out
    raise ValueError(f"Unexpected checkpoint tensor {name!r} for a {family} model.")


# --------------------------------------------------------------------------------------------
# GGUF (llama.cpp) names -> HF names, for the llama-family architectures
# --------------------------------------------------------------------------------------------

_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_GGUF_BLOCK = {"attn_norm.weight": "input_layernorm.weight",
               "ffn_norm.weight": "post_attention_layernorm.weight",
               "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
               "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
               "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
               "attn_output.weight": "self_attn.o_proj.weight",
               "attn_q_norm.weight": "self_attn.q_norm.weight",
               "attn_k_norm.weight": "self_attn.k_norm.weight",
               "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
               "ffn_down.weight": "mlp.down_proj.weight"}


def gguf_to_hf_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _GGUF_BLOCK:
        return f"model.layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}"
    raise ValueError(f"Unexpected GGUF tensor {name!r}.")


def unpermute_gguf_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (``convert_hf_to_gguf.py``'s ``permute``).

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ...; HF rotates halves
    (x0, x_{H/2}), ... Its converter reorders each head's rows from HF's half-split order to
    interleaved; this puts them back. ``num_heads`` is N for Q and K for K; works on biases too.
    """
    half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # (heads, H/2, 2, ...)
    return w.swapaxes(1, 2).reshape(weight.shape)  # (heads, 2, H/2, ...) flattened
