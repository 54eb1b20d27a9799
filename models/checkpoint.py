"""jaxpage checkpoints: a model converted once into the layout the models use, for fast starts.

``jaxpage convert SRC OUT`` (``convert``) loads an HF directory or a GGUF file the slow way —
name tables, transposes, llama.cpp's Q/K permutation, GGUF dequantization — and writes what came
out: the parameters as an orbax checkpoint (tensorstore), beside the config and tokenizer that
go with them. ``load_model(OUT)`` then restores every parameter straight into its target
sharding (``placement``): with tensor parallelism each device reads its own slice from disk, and
no name mapping or dequantization runs again.

    OUT/jaxpage_checkpoint.json   format version, dtype, architecture, every parameter's shape,
                                  what the config alone cannot carry (GGUF rope factors, eos
                                  ids, chat template), where it came from
    OUT/config.json               the HF config (synthesized from the metadata of a GGUF file)
    OUT/generation_config.json    when the source has one
    OUT/tokenizer*                the tokenizer (transformers' ``save_pretrained``)
    OUT/params/                   orbax ``StandardCheckpointer``: {"layers.0.mlp.up_proj": array, ...}

The parameters keep the dtype they were converted to; a load in another dtype casts them on
restore.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

META_FILE = "jaxpage_checkpoint.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def is_checkpoint(path: Path) -> bool:
    """True for a directory ``convert`` wrote."""
    return path.is_dir() and (path / META_FILE).is_file()


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's ``jaxpage_checkpoint.json``, checked for what the loader needs."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{META_FILE} in {str(path)!r} is not valid JSON: {e}") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} is a jaxpage checkpoint of format {version!r}; this "
                         f"jaxpage reads format {FORMAT_VERSION}. Convert the source again.")
    for key in ("dtype", "params"):
        if key not in meta:
            raise ValueError(f"{META_FILE} in {str(path)!r} lacks {key!r}: not written by "
                             "jaxpage convert, or damaged.")
    if not (path / PARAMS_DIR).is_dir():
        raise FileNotFoundError(f"No {PARAMS_DIR}/ in {str(path)!r}: the checkpoint's weights "
                                "are missing (an interrupted convert?).")
    return meta


def _flat_params(model: nnx.Module) -> dict[str, Any]:
    """{"layers.0.self_attn.q_proj": Variable, ...} of every parameter, in the model's order."""
    _, state = nnx.split(model)
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def save_checkpoint(loaded, out: str | os.PathLike, *, source: str,
                    rope_freq_divisors: list[float] | None = None) -> Path:
    """Writes ``loaded`` (a ``loader.LoadedModel`` with real weights) as a jaxpage checkpoint
    in the empty or new directory ``out``; returns its path."""
    import orbax.checkpoint as ocp

    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"Output {str(out)!r} exists and is not an empty directory; pick a new one.")
    params = {k: v.get_value() for k, v in _flat_params(loaded.model).items()}
    dtypes = {np.dtype(a.dtype).name for a in params.values()}
    out.mkdir(parents=True, exist_ok=True)
    try:
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(out / PARAMS_DIR, params)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        _write_json(out / "config.json", loaded.hf_config)
        if loaded.generation_config:
            _write_json(out / "generation_config.json", loaded.generation_config)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(out))
        meta = {"format_version": FORMAT_VERSION, "dtype": dtypes.pop() if len(dtypes) == 1 else None,
                "architecture": loaded.architecture, "source": source,
                "rope_freq_divisors": rope_freq_divisors,
                "eos_token_ids": list(loaded.eos_token_ids), "chat_template": loaded.chat_template,
                "params": {k: list(a.shape) for k, a in params.items()}}
        # Written last: a directory without it is not a checkpoint (an interrupted convert).
        _write_json(out / META_FILE, meta)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def restore_params(abstract: nnx.Module, path: Path, meta: dict[str, Any],
                   placement: Callable[[str, tuple[int, ...]], Any] | None = None) -> nnx.Module:
    """Fills ``abstract`` (``nnx.eval_shape``, in the dtype to load) from the checkpoint at
    ``path``; each parameter is read into ``placement(name, shape)`` (None: the default device)."""
    import orbax.checkpoint as ocp

    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    names = {".".join(map(str, p)): p for p in flat}
    saved = {k: tuple(v) for k, v in meta["params"].items()}
    missing = [k for k in names if k not in saved]
    extra = [k for k in saved if k not in names]
    wrong = [f"{k} {saved[k]} (model: {tuple(flat[p].get_value().shape)})"
             for k, p in names.items() if k in saved
             and saved[k] != tuple(flat[p].get_value().shape)]
    if missing or extra or wrong:
        raise ValueError(
            f"Checkpoint {str(path)!r} does not fit the model its config.json describes: "
            + "; ".join(f"{what}: {', '.join(items[:5])}" for what, items in
                        (("missing", missing), ("unknown", extra), ("shape", wrong)) if items))
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {}
    for name, p in names.items():
        value = flat[p].get_value()
        shape = tuple(value.shape)
        sharding = None if placement is None else placement(str(p[-1]), shape)
        target[name] = jax.ShapeDtypeStruct(shape, value.dtype, sharding=sharding or default)
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore((path / PARAMS_DIR).absolute(), target)
    finally:
        checkpointer.close()
    for name, p in names.items():
        flat[p].set_value(restored[name])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def convert(source: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
            tokenizer: str | os.PathLike | None = None) -> Path:
    """Loads ``source`` (an HF directory or a GGUF file) on the host CPU in ``dtype`` and writes
    it to ``out`` as a jaxpage checkpoint (``jaxpage convert``); returns ``out``'s path."""
    from jaxpage.models.loader import load_model

    src = Path(source).expanduser()
    if src.exists() and is_checkpoint(src):
        raise ValueError(f"{str(src)!r} is a jaxpage checkpoint already.")
    divisors: list = []
    with jax.default_device(jax.devices("cpu")[0]):  # conversion is I/O: keep the GPU free
        loaded = load_model(src, dtype=dtype, tokenizer_path=tokenizer,
                            before_weights=lambda cfg: divisors.append(
                                getattr(getattr(cfg, "rope", None), "freq_divisors", None)))
    d = divisors[0]
    return save_checkpoint(loaded, out, source=str(src.absolute()),
                           rope_freq_divisors=None if d is None else [float(x) for x in d])
