"""Typed engine configuration, validated once. ``EngineArgs`` maps LLM(**kwargs) / CLI flags."""

from __future__ import annotations

from dataclasses import dataclass, field

# Where weights come from: "auto" (by what the path holds), an HF directory's safetensors, a
# GGUF file, a jaxpage checkpoint (``jaxpage convert``: orbax), or random weights from the config.
LOAD_FORMATS = ("auto", "safetensors", "gguf", "orbax", "dummy")


@dataclass
class CacheConfig:
    """The paged KV pool.

    Args:
        page_size: tokens per page (vLLM's ``block_size``).
        gpu_memory_utilization: fraction of device memory for weights + KV pool.
        num_pages: explicit pool size (overrides gpu_memory_utilization); page 0 is the null page.
        kv_cache_dtype: "auto" (the model's dtype), "fp8" / "fp8_e4m3" / "fp8_e5m2" (one byte
            per value, twice the pages; vLLM's names, no scale factors), or a float dtype name.
        enable_prefix_caching: reuse full pages of identical prefixes across requests.
        calculate_kv_scales: with an fp8 pool, per-layer scales for K and V (vLLM's name):
            computed on the first step from its own K and V, then fixed; the pool stores
            K / k_scale and V / v_scale (``models/attention.ScaledKVPool``).
    """

    page_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_pages: int | None = None
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    calculate_kv_scales: bool = False

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {self.num_pages}.")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}.")
        if self.calculate_kv_scales and not self.kv_cache_dtype.startswith("fp8"):
            raise ValueError("calculate_kv_scales needs an fp8 kv_cache_dtype (fp8, fp8_e4m3 "
                             f"or fp8_e5m2), got kv_cache_dtype={self.kv_cache_dtype!r}.")


# kv_cache_dtype -> the pool's dtype name (None: the model's). vLLM's fp8 names map to the OCP
# types; "fp8" is e4m3 (more mantissa, range +-448), as in vLLM.
KV_CACHE_DTYPES = {"auto": None, "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
                   "fp8_e5m2": "float8_e5m2", "float8_e4m3fn": "float8_e4m3fn",
                   "float8_e5m2": "float8_e5m2", "bfloat16": "bfloat16", "float16": "float16",
                   "float32": "float32"}


def kv_cache_dtype_name(kv_cache_dtype: str, model_dtype: str) -> str:
    """The pool's dtype name for ``CacheConfig.kv_cache_dtype`` under a model of ``model_dtype``."""
    return KV_CACHE_DTYPES[kv_cache_dtype] or model_dtype


@dataclass
class SchedulerConfig:
    """Continuous batching limits.

    Args:
        max_num_seqs: most requests in one step.
        max_num_batched_tokens: token budget of one step (prefill chunks + decodes).
        max_model_len: longest sequence (prompt + output) a request may reach.
        enable_chunked_prefill: split long prompts across steps under the token budget.
        max_waiting_requests: cap on the waiting queue (RELIABILITY: bounded everything).
        token_padding_gap: 0 pads a step's tokens to the next power of two; g (a multiple of
            16) pads to powers of two up to g, then to the next multiple of g — fewer padding
            rows in partly filled steps, more buckets to compile.
        async_scheduling: schedule and launch step N + 1 before reading step N's tokens back,
            so that the host's work overlaps the device's (the tokens feed the next step on
            the device; stop checks run one step late).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    max_waiting_requests: int = 100_000
    token_padding_gap: int = 0
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        if self.token_padding_gap < 0 or self.token_padding_gap % 16:
            raise ValueError(f"token_padding_gap must be 0 or a positive multiple of 16, got "
                             f"{self.token_padding_gap}.")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}.")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}.")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is off.")


@dataclass
class ModelConfig:
    """Which model to load and how.

    Args:
        model: HF directory, ``.gguf`` file, or "default" (SmolLM2-135M-Instruct, fetched once).
        dtype: "auto" (bfloat16 on accelerators, float32 on CPU), "float32", "bfloat16", "float16".
        load_format: one of LOAD_FORMATS: "auto" | "safetensors" | "gguf" | "orbax" (a
            ``jaxpage convert`` checkpoint) | "dummy" (random weights from the config).
        max_model_len: None takes the model's own limit.
        seed: seed for dummy weights and for requests without their own seed.
        attention_backend: "auto" | "reference" | "pallas".
    """

    model: str = "default"
    tokenizer: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}.")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got "
                             f"{self.load_format!r}.")
        if self.attention_backend not in ("auto", "reference", "pallas"):
            raise ValueError(f"attention_backend must be auto, reference or pallas, got {self.attention_backend!r}.")


@dataclass
class ParallelConfig:
    """How the model spreads over devices (``jaxpage/sharding.py``).

    Args:
        tensor_parallel_size: devices the weights and the KV pool split over (by heads and
            by the MLP's width); 1 runs on one device with no sharding at all.
    """

    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}.")


# Draft methods of speculative decoding (vLLM's ``speculative_config["method"]``).
SPECULATIVE_METHODS = ("ngram",)


@dataclass
class SpeculativeConfig:
    """Speculative decoding (vLLM's ``speculative_config``): each step a request in decode
    runs its last token plus up to ``num_speculative_tokens`` drafted ones, and keeps the
    drafts the model's own sampling agrees with, plus one token of its own.

    Args:
        method: "ngram" (prompt lookup: the tokens that followed the latest earlier match of
            the context's last n tokens, n from ``prompt_lookup_max`` down to
            ``prompt_lookup_min``; no draft model).
        num_speculative_tokens: most drafted tokens per request and step (k).
        prompt_lookup_max, prompt_lookup_min: the longest and shortest n-gram matched.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config: method must be one of "
                             f"{', '.join(SPECULATIVE_METHODS)}, got {self.method!r}.")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config: {name} must be an integer >= 1, got "
                                 f"{value!r}.")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config: num_speculative_tokens must be <= "
                             f"{MAX_SPECULATIVE_TOKENS}, got {self.num_speculative_tokens}.")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config: prompt_lookup_min ({self.prompt_lookup_min}) "
                             f"exceeds prompt_lookup_max ({self.prompt_lookup_max}).")

    @classmethod
    def from_user(cls, value) -> "SpeculativeConfig | None":
        """``LLM(speculative_config=...)``: None, a dict with vLLM's keys, or a config."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a dict such as {\"method\": \"ngram\", "
                             f"\"num_speculative_tokens\": 4}}, got {type(value).__name__}.")
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {sorted(unknown)}; valid ones: "
                             f"{sorted(cls.__dataclass_fields__)}.")
        return cls(**value)


# Drafts per request and step beyond which a verify step's logits rows (R x (1 + k)) stop
# paying: the acceptance of the j-th draft falls geometrically.
MAX_SPECULATIVE_TOKENS = 16


@dataclass
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    compilation_cache_dir: str | None = field(default=None)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    speculative_config: SpeculativeConfig | None = None


# Tokens per KV page on GPUs unless set: on the H100 a mixed prefill + decode step's attention
# took 209 µs at pages of 64 (or 128) tokens against 217 at 16, prefill-only 87 against 91, and
# decode-only steps the same at every page size (docs/benchmarks/NOTES.md, twelfth pass;
# kernels_h100.md). The price: prefix caching and a request's last page in 64-token steps.
GPU_BLOCK_SIZE = 64


@dataclass
class EngineArgs:
    """Every knob of ``LLM(**kwargs)`` and the CLI, with vLLM's names; ``None`` means "pick a
    default for the platform" (accelerators get bfloat16 and larger batches than the CPU)."""

    model: str | None = "default"
    tokenizer: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    hf_config: dict | None = None  # replaces config.json; with load_format="dummy", model may be None
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str = "auto"
    block_size: int | None = None  # None: 64 on GPU, 16 elsewhere (GPU_BLOCK_SIZE)
    gpu_memory_utilization: float = 0.9
    num_pages: int | None = None
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = False  # fp8 pools: per-layer K/V scales from the first step
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    token_padding_gap: int = 0  # 0: steps pad to powers of two (SchedulerConfig)
    # Launch step N + 1 before reading step N back: on by default (H200, llama3.2-1b shape:
    # +35% greedy / +28% sampled output tok/s, docs/benchmarks/engine.md).
    async_scheduling: bool = True
    compilation_cache_dir: str | None = None  # None: ~/.cache/jaxpage/xla; "": off
    compile_all_buckets: bool | None = None  # None: on for accelerators, lazy on CPU
    tensor_parallel_size: int = 1  # devices the model splits over (ParallelConfig)
    compile_workers: int = 1  # XLA compiles at once at start-up (lowering stays one by one)
    # Speculative decoding, vLLM's dict: {"method": "ngram", "num_speculative_tokens": 4,
    # "prompt_lookup_max": 4, "prompt_lookup_min": 1} (SpeculativeConfig); None: off.
    speculative_config: dict | SpeculativeConfig | None = None

    def create_engine_config(self, *, platform: str, model_max_len: int) -> EngineConfig:
        accel = platform != "cpu"
        max_model_len = self.max_model_len or model_max_len
        if max_model_len > model_max_len:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's limit {model_max_len}.")
        max_num_seqs = self.max_num_seqs or (128 if accel else 16)
        batched = self.max_num_batched_tokens or (4096 if accel else 512)
        if not self.enable_chunked_prefill:
            batched = max(batched, max_model_len)
        return EngineConfig(
            model_config=ModelConfig(model=self.model, tokenizer=self.tokenizer, dtype=self.dtype,
                                     load_format=self.load_format, max_model_len=max_model_len,
                                     seed=self.seed, attention_backend=self.attention_backend),
            cache_config=CacheConfig(page_size=self.block_size or (
                                         GPU_BLOCK_SIZE if platform == "gpu" else 16),
                                     gpu_memory_utilization=self.gpu_memory_utilization,
                                     num_pages=self.num_pages, kv_cache_dtype=self.kv_cache_dtype,
                                     enable_prefix_caching=self.enable_prefix_caching,
                                     calculate_kv_scales=self.calculate_kv_scales),
            scheduler_config=SchedulerConfig(max_num_seqs=max_num_seqs,
                                             max_num_batched_tokens=batched,
                                             max_model_len=max_model_len,
                                             enable_chunked_prefill=self.enable_chunked_prefill,
                                             token_padding_gap=self.token_padding_gap,
                                             async_scheduling=self.async_scheduling),
            compilation_cache_dir=self.compilation_cache_dir,
            parallel_config=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size),
            speculative_config=SpeculativeConfig.from_user(self.speculative_config),
        )
