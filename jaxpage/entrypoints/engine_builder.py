"""Builds a ready engine (weights, KV pool, compiled steps) from ``EngineArgs``."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from jaxpage.config import EngineArgs, kv_cache_dtype_name
from jaxpage.default_model import cache_dir, resolve_model
from jaxpage.engine.llm_engine import LLMEngine
from jaxpage.models.loader import LoadedModel, load_model, resolve_dtype
from jaxpage.runner.model_runner import ModelRunner
from jaxpage.sharding import check_tensor_parallel, make_mesh, param_sharding

logger = logging.getLogger("jaxpage")


def enable_compilation_cache(path: str | None) -> None:
    """JAX's persistent compilation cache: warm starts skip XLA compilation. ``""`` turns it off."""
    if path == "":
        return
    path = path or str(cache_dir() / "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def build_engine(args: EngineArgs) -> tuple[LLMEngine, LoadedModel]:
    platform = jax.default_backend()
    enable_compilation_cache(args.compilation_cache_dir)
    dtype = jnp.dtype(resolve_dtype(args.dtype)).name  # "auto": bfloat16 on accelerators, f32 on CPU
    path = None if args.model is None else resolve_model(args.model)
    # The engine's configuration is made (and its arguments checked) from the model's config,
    # before the weights load.
    made, meshes = [], []

    def before_weights(config) -> None:
        made.append(args.create_engine_config(platform=platform,
                                              model_max_len=config.max_position_embeddings))
        tp = made[0].parallel_config.tensor_parallel_size
        check_tensor_parallel(config, tp)
        meshes.append(make_mesh(tp))  # None for one device; raises if too few devices

    def placement(name: str, shape: tuple[int, ...]):
        # Tensor parallel: checkpoint tensors go from the host straight to their shards.
        return None if meshes[0] is None else param_sharding(meshes[0])(name, shape)

    loaded = load_model(path, dtype=dtype, load_format=args.load_format, seed=args.seed,
                        hf_config=args.hf_config, tokenizer_path=args.tokenizer,
                        before_weights=before_weights, placement=placement)
    cfg = made[0]
    spec = cfg.speculative_config
    kv_dtype = kv_cache_dtype_name(cfg.cache_config.kv_cache_dtype, jnp.dtype(dtype).name)
    runner = ModelRunner(loaded.model, cache_config=cfg.cache_config,
                         scheduler_config=cfg.scheduler_config,
                         max_model_len=cfg.scheduler_config.max_model_len,
                         kv_dtype=jnp.dtype(kv_dtype), attention_backend=args.attention_backend,
                         compile_all_buckets=args.compile_all_buckets,
                         parallel_config=cfg.parallel_config,
                         compile_workers=args.compile_workers,
                         num_speculative_tokens=spec.num_speculative_tokens if spec else 0)
    engine = LLMEngine(runner, loaded.tokenizer, scheduler_config=cfg.scheduler_config,
                       cache_config=cfg.cache_config, num_pages=runner.num_pages,
                       vocab_size=loaded.config.vocab_size, eos_token_ids=loaded.eos_token_ids,
                       max_model_len=cfg.scheduler_config.max_model_len, seed=args.seed,
                       speculative_config=spec)
    return engine, loaded
