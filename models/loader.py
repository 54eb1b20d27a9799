"""Loads a model for jaxpage: HF directories (safetensors), GGUF files, or dummy weights.

    load_model(path)                     config.json + *.safetensors (+ tokenizer, generation_config)
    load_model("x.gguf")                 llama.cpp file: weights dequantized, tokenizer from the file
    load_model(out)                      a jaxpage checkpoint (``jaxpage convert``, ``checkpoint.py``):
                                         orbax, each parameter read straight into its sharding
    load_model(path, load_format="dummy")   random weights from the config (benchmarks)
    load_model(None, load_format="dummy", hf_config={...})

Nothing is ever downloaded (tokenizers load with ``local_files_only=True``) and nothing is ever
unpickled: ``.bin`` / ``.pt`` checkpoints are refused (no ``torch.load``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpage.config import LOAD_FORMATS
from jaxpage.models import checkpoint, registry, weight_map

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass
class LoadedModel:
    """Everything the engine needs from a checkpoint.

    Fields:
        model: the Flax NNX model (``__call__``, ``compute_logits``, ``.config``).
        config: the model's static config (``num_hidden_layers``, ``num_key_value_heads``, ...).
        hf_config: the HF config dict it was built from (synthesized from metadata for GGUF).
        generation_config: ``generation_config.json`` as a dict ({} if absent); its sampling
            defaults (``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``) are the model's.
        chat_template: Jinja chat template, or None.
        tokenizer: a transformers tokenizer, or None when the checkpoint ships none.
        eos_token_ids: every id that ends generation (generation config, config, tokenizer).
        max_model_len: the model's context limit (``max_position_embeddings``).
        architecture: the resolved HF architecture name.
    """

    model: nnx.Module
    config: Any
    hf_config: dict[str, Any]
    generation_config: dict[str, Any]
    chat_template: str | None
    tokenizer: Any
    eos_token_ids: list[int]
    max_model_len: int
    architecture: str


def resolve_dtype(dtype: str | Any) -> Any:
    """"float32" | "bfloat16" | "float16" | "auto" (bfloat16 on accelerators, float32 on CPU)."""
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}.")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def load_model(model_path: str | os.PathLike | None, *, dtype: str = "float32",
               load_format: str = "auto", seed: int = 0, hf_config: dict[str, Any] | None = None,
               tokenizer_path: str | os.PathLike | None = None,
               before_weights: Callable[[Any], None] | None = None,
               placement: Callable[[str, tuple[int, ...]], Any] | None = None) -> LoadedModel:
    """Loads weights, config, tokenizer and generation defaults.

    Args:
        model_path: an HF model directory, a ``.gguf`` file (or a directory holding exactly one),
            or None with ``load_format="dummy"`` and ``hf_config``.
        dtype: parameter and compute dtype.
        load_format: "auto" | "safetensors" | "gguf" | "orbax" (a ``jaxpage convert``
            checkpoint) | "dummy" (random weights from the config).
        seed: seed for dummy weights.
        hf_config: an HF config dict that replaces the checkpoint's ``config.json``.
        tokenizer_path: a directory to load the tokenizer from instead of ``model_path``.
        before_weights: called with the model's config once it is read, before any weight is
            (the engine checks its own arguments there: a bad flag fails before a long load).
        placement: ``(parameter name, shape) -> jax Sharding or None`` (tensor parallelism's
            split; None: the default device): each checkpoint tensor goes from the host
            straight to its shards, and dummy weights are drawn there, so no device ever
            holds the whole model. With it, dummy weights are drawn parameter by parameter
            with threefry, whose bits do not depend on the sharding: one seed gives the same
            model at every tensor-parallel size.

    Raises:
        FileNotFoundError: a missing path, config or weights.
        ValueError: an unsupported architecture, format, dtype or a pickle checkpoint.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}.")
    jdtype = resolve_dtype(dtype)
    fmt, path = _resolve_source(model_path, load_format, hf_config)
    gguf, meta = None, None
    if fmt == "orbax":
        meta = checkpoint.read_meta(path)
    if path is not None and path.suffix == ".gguf":
        from jaxpage.models.gguf_file import GGUFCheckpoint
        gguf = GGUFCheckpoint(path)
        hf = dict(hf_config or gguf.hf_config)
    else:
        hf = dict(hf_config) if hf_config is not None else _read_json(path / "config.json")

    architecture = registry.resolve_architecture(hf)
    config_cls, model_cls, family = registry.get_model_classes(architecture)
    config = config_cls.from_hf(hf)
    if gguf is not None and gguf.rope_freq_divisors is not None:
        config = dataclasses.replace(config, rope=dataclasses.replace(
            config.rope, freq_divisors=gguf.rope_freq_divisors))
    if meta is not None and meta.get("rope_freq_divisors") is not None:  # a converted GGUF's
        config = dataclasses.replace(config, rope=dataclasses.replace(
            config.rope, freq_divisors=tuple(float(x) for x in meta["rope_freq_divisors"])))
    if before_weights is not None:
        before_weights(config)

    def create(key) -> nnx.Module:
        return model_cls(config, dtype=jdtype, param_dtype=jdtype, rngs=nnx.Rngs(params=key))

    if fmt == "dummy" and placement is not None:
        model = _dummy_weights(create, seed, placement)
    elif fmt == "dummy":
        # Eager, op by op: each parameter is drawn on the device directly in the target dtype,
        # and XLA compiles one small RNG program per distinct shape (jitting the whole
        # constructor instead compiles one program per parameter: minutes for an 8B model).
        # The RBG generator compiles and runs much faster than threefry for such bulk draws.
        model = create(jax.random.key(seed, impl="rbg"))
    elif fmt == "orbax":
        abstract = nnx.eval_shape(lambda: create(jax.random.key(seed)))
        model = checkpoint.restore_params(abstract, path, meta, placement)
    else:
        tensors = gguf.tensors() if gguf is not None else _iter_safetensors(path)
        abstract = nnx.eval_shape(lambda: create(jax.random.key(seed)))
        model = _assign_weights(abstract, family, tensors, source=str(model_path),
                                placement=placement)

    tokenizer, chat_template, generation_config, eos = _load_tokenizer_and_defaults(
        path, gguf, hf, tokenizer_path, meta)
    return LoadedModel(model=model, config=config, hf_config=hf, generation_config=generation_config,
                       chat_template=chat_template, tokenizer=tokenizer, eos_token_ids=eos,
                       max_model_len=int(config.max_position_embeddings), architecture=architecture)


def _dummy_weights(create: Callable[[Any], nnx.Module], seed: int,
                   placement: Callable[[str, tuple[int, ...]], Any]) -> nnx.Module:
    """Random weights drawn straight into their shardings, each parameter as its constructor
    would draw it (``layers.param`` / ``zeros`` / ``ones`` record how), keyed by its index."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: create(jax.random.key(seed))))
    flat = dict(nnx.to_flat_state(state))
    base = jax.random.key(seed, impl="threefry2x32")
    for i, (path, var) in enumerate(flat.items()):
        abstract = var.get_value()
        shape = tuple(abstract.shape)
        init = var.get_metadata().get("dummy_init")
        if init is None:
            raise ValueError(f"parameter {'.'.join(map(str, path))} records no dummy_init: create "
                             "it with models.layers.param / zeros / ones.")
        draw = _dummy_draw(init, shape, jnp.dtype(abstract.dtype), placement(str(path[-1]), shape))
        var.set_value(draw(jax.random.fold_in(base, i)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@functools.lru_cache(maxsize=None)
def _dummy_draw(init: tuple, shape: tuple[int, ...], dtype, sharding) -> Callable:
    """One compiled draw per distinct (init, shape, dtype, sharding): a few per model."""
    def draw(key):
        if init[0] == "normal":
            return init[1] * jax.random.normal(key, shape, dtype)
        return (jnp.ones if init[0] == "ones" else jnp.zeros)(shape, dtype)
    return jax.jit(draw) if sharding is None else jax.jit(draw, out_shardings=sharding)


# --------------------------------------------------------------------------------------------
# Finding the checkpoint
# --------------------------------------------------------------------------------------------

def _resolve_source(model_path, load_format: str, hf_config) -> tuple[str, Path | None]:
    """Validates the path and returns (format, path to the HF directory or the .gguf file)."""
    if model_path is None:
        if load_format == "dummy" and hf_config is not None:
            return "dummy", None
        raise ValueError("model_path is required (None only with load_format='dummy' and hf_config).")
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Model path {str(model_path)!r} does not exist. Pass an HF model directory "
            "(config.json + *.safetensors) or a .gguf file.")
    if checkpoint.is_checkpoint(path) and load_format in ("auto", "orbax"):
        return "orbax", path
    if load_format == "orbax":
        raise ValueError(f"load_format='orbax' but {str(model_path)!r} is not a jaxpage checkpoint "
                         f"(no {checkpoint.META_FILE}); write one with `jaxpage convert`.")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise ValueError(_no_pickle_message(path))
        if path.suffix != ".gguf":
            raise ValueError(f"Unsupported model file {path.name!r}: pass a .gguf file or an HF "
                             "model directory (config.json + *.safetensors).")
        if load_format == "safetensors":
            raise ValueError(f"load_format='safetensors' but {path.name!r} is a GGUF file.")
        return ("dummy" if load_format == "dummy" else "gguf"), path

    has_config = (path / "config.json").is_file()
    has_safetensors = any(path.glob("*.safetensors"))
    ggufs = sorted(path.glob("*.gguf"))
    want_gguf = load_format == "gguf" or (load_format == "auto" and ggufs and not has_safetensors)
    if want_gguf or (load_format == "dummy" and not has_config and ggufs):
        if len(ggufs) != 1:
            raise (FileNotFoundError if not ggufs else ValueError)(
                f"Expected exactly one .gguf file in {str(path)!r}, found {len(ggufs)}; "
                "pass the file itself.")
        return ("dummy" if load_format == "dummy" else "gguf"), ggufs[0]
    if not has_config and hf_config is None:
        raise FileNotFoundError(f"No config.json in {str(path)!r}: not an HF model directory.")
    if load_format != "dummy" and not has_safetensors:
        pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(_no_pickle_message(pickles[0]))
        raise FileNotFoundError(f"No *.safetensors weights in {str(path)!r}.")
    return ("dummy" if load_format == "dummy" else "safetensors"), path


def _no_pickle_message(path: Path) -> str:
    return (f"Refusing to load pickle checkpoint {path.name!r}: jaxpage never unpickles weights "
            "(no torch.load). Convert it to safetensors, e.g. with transformers: "
            "model.save_pretrained(dir, safe_serialization=True).")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path.name} in {str(path.parent)!r} is not valid JSON: {e}") from None


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def _iter_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every tensor, memory-mapped, one at a time (bf16 via ml_dtypes)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names the files (skipping e.g. consolidated.*)
        files = sorted({path / f for f in _read_json(index)["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    for file in files:
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _assign_weights(abstract: nnx.Module, family: str, tensors: Iterable[tuple[str, np.ndarray]],
                    source: str, placement=None) -> nnx.Module:
    """Fills an abstract (``nnx.eval_shape``) model from checkpoint tensors; checks coverage."""
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))

    def target_shape(p):
        return tuple(flat[p].get_value().shape) if p in flat else None

    filled = set()
    for name, weight in tensors:
        for p, arr in weight_map.convert(family, name, weight, target_shape):
            var = flat[p]
            value = jax.device_put(arr, None if placement is None else
                                   placement(str(p[-1]), tuple(arr.shape)))
            dtype = var.get_value().dtype
            var.set_value(value if value.dtype == dtype else value.astype(dtype))
            filled.add(p)
    missing = [".".join(map(str, p)) for p in flat if p not in filled]
    if missing:
        raise ValueError(f"Checkpoint {source!r} lacks {len(missing)} parameter(s), e.g. "
                         f"{', '.join(missing[:5])}.")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# --------------------------------------------------------------------------------------------
# Tokenizer, chat template, generation defaults
# --------------------------------------------------------------------------------------------

def _load_tokenizer_and_defaults(path: Path | None, gguf, hf: dict[str, Any], tokenizer_path,
                                 meta: dict[str, Any] | None = None):
    from transformers import AutoTokenizer  # lazy: slow import

    tokenizer, chat_template, generation_config = None, None, {}
    eos: list[int] = []
    tok_dir = Path(tokenizer_path).expanduser() if tokenizer_path is not None else None
    if tok_dir is None and path is not None:
        tok_dir = path.parent if gguf is not None or path.is_file() else path
    try:
        if tokenizer_path is None and gguf is not None and gguf.has_tokenizer:
            # Built from the file's metadata without torch; AutoTokenizer's GGUF path (which
            # needs torch under transformers 5) only where this transformers lacks the converter.
            tokenizer = gguf.build_tokenizer() or AutoTokenizer.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True)
        elif tok_dir is not None and any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as e:  # a broken tokenizer is the user's to fix; say which one
        raise ValueError(f"Cannot load the tokenizer from {str(tok_dir)!r}: {e}") from None
    if path is not None and path.is_dir() and (path / "generation_config.json").is_file():
        generation_config = _read_json(path / "generation_config.json")
    if gguf is not None:
        chat_template = gguf.chat_template
        eos += gguf.eos_token_ids
    if meta is not None:  # a converted checkpoint keeps its source's (a GGUF's eos ids)
        chat_template = meta.get("chat_template")
        eos += meta.get("eos_token_ids") or []
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        chat_template = chat_template or tokenizer.chat_template
    for source in (generation_config.get("eos_token_id"), hf.get("eos_token_id"),
                   getattr(tokenizer, "eos_token_id", None)):
        eos += [source] if isinstance(source, int) else list(source or [])
    return tokenizer, chat_template, generation_config, list(dict.fromkeys(int(i) for i in eos))
