"""Device side of a step: staging → one packed transfer → precompiled jitted forward → sampler.

One executable per (T, R) bucket, AOT-compiled (``lower().compile()``) at start-up or on first
use; the KV pool is donated so every layer's page writes happen in place.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpage import kernels_pallas, sharding
from jaxpage.config import CacheConfig, ParallelConfig, SchedulerConfig
from jaxpage.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from jaxpage.models.attention import AttentionMetadata
from jaxpage.runner import kv_cache
from jaxpage.runner.buckets import Buckets
from jaxpage.runner.input_batch import InputBatch, PackedLayout, packing_order
from jaxpage.runner.sampling import PendingPromptLogprobs, PendingSample, StepSampler

logger = logging.getLogger("jaxpage")


def _forward(params, kv_pages, packed, last_sampled, *, graphdef, state_treedef,
             layout: PackedLayout, backend: str, all_logits: bool, decode_only: bool,
             hidden: bool = False, mesh=None):
    """One step: (logits rows, the pool, extras). ``params`` are the flat leaves of the
    model's nnx.State: flattening a tuple per call is cheap, flattening an nnx.State is not.
    ``last_sampled`` (max_num_seqs,) holds each slot's last sampled token on the device: the
    input of a token still in flight. ``mesh``: tensor parallelism's (the logits leave
    replicated, whole on every device). ``extras``: with ``all_logits`` the logits of every
    token, "all_logits" (T, V); with ``hidden`` the final hidden states of the logits rows,
    "hidden" (rows, D) float32."""
    state = jax.tree.unflatten(state_treedef, params)
    a = layout.unpack(packed)
    ph = a["placeholder_slots"]  # (T,) slot + 1, or 0
    input_ids = jnp.where(ph > 0, last_sampled[jnp.maximum(ph - 1, 0)], a["input_ids"])
    md = AttentionMetadata(slot_mapping=a["slot_mapping"], block_tables=a["block_tables"],
                           seq_lens=a["seq_lens"], query_start_loc=a["query_start_loc"],
                           num_seqs=a["num_seqs"], attention_backend=backend,
                           max_q_len=1 if decode_only else None, mesh=mesh)
    model = nnx.merge(graphdef, state)
    states, kv_pages = model(input_ids, a["positions"], kv_pages, md)  # (T, D)
    whole = (lambda x: x) if mesh is None else functools.partial(sharding.gather_logits,
                                                                 mesh=mesh)
    extras = {}
    if hidden:  # return_hidden (LLM.embed): the rows' final hidden states
        extras["hidden"] = states[a["logits_indices"]].astype(jnp.float32)
    if all_logits:  # prompt_logprobs: logits of every token, (T, V)
        extras["all_logits"] = logits_all = whole(model.compute_logits(states))
        return logits_all[a["logits_indices"]], kv_pages, extras
    logits = whole(model.compute_logits(states[a["logits_indices"]]))  # (R, V) float32
    return logits, kv_pages, extras


class ModelRunner:
    """Owns the weights, the KV pool and the compiled steps; executes ``SchedulerOutput``s.

    Args:
        model: a jaxpage.models model (``__call__`` / ``compute_logits`` / ``.config``).
        kv_dtype: dtype of the KV pool.
        attention_backend: "auto" | "reference" | "pallas".
        compile_all_buckets: AOT-compile every bucket now (default on accelerators) instead of
            on first use.
        parallel_config: tensor parallelism (``jaxpage/sharding.py``); default one device.
        compile_workers: XLA compiles at once in ``precompile`` (1: one after the other).
        num_speculative_tokens: most drafts per request and step (speculative decoding): the
            steps then return logits for every position that samples, not only the last.
    """

    def __init__(self, model, *, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                 max_model_len: int, kv_dtype, attention_backend: str = "auto",
                 compile_all_buckets: bool | None = None,
                 parallel_config: ParallelConfig | None = None, compile_workers: int = 1,
                 num_speculative_tokens: int = 0):
        cfg = model.config
        self.num_speculative_tokens = num_speculative_tokens
        self.vocab_size = cfg.vocab_size
        self.max_model_len = max_model_len
        self.page_size = cache_config.page_size
        self.backend = kernels_pallas.resolve_backend(attention_backend)
        if self.backend != "reference" and jax.default_backend() == "cpu":
            raise ValueError("attention_backend='pallas' needs a GPU or TPU; on CPU use 'auto' "
                             "or 'reference'.")
        tp = (parallel_config or ParallelConfig()).tensor_parallel_size
        sharding.check_tensor_parallel(cfg, tp)
        self.mesh = sharding.make_mesh(tp)  # None on one device
        # Where host inputs go: replicated over the mesh, or the default device.
        self._inputs = None if self.mesh is None else sharding.replicated(self.mesh)
        if self.mesh is not None:
            model = sharding.shard_model(model, self.mesh)
        self.graphdef, state = nnx.split(model)
        leaves, self.state_treedef = jax.tree.flatten(state)
        self.params = tuple(leaves)  # what each step is called with
        self.spec = kv_cache.KVCacheSpec(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                         cache_config.page_size, jnp.dtype(kv_dtype), shards=tp,
                                         scaled=cache_config.calculate_kv_scales)
        device = jax.devices()[0]
        self.num_pages = kv_cache.determine_num_pages(
            self.spec, num_pages=cache_config.num_pages,
            gpu_memory_utilization=cache_config.gpu_memory_utilization, max_model_len=max_model_len,
            max_num_seqs=scheduler_config.max_num_seqs, device=device,
            reserve_bytes=self._activation_reserve(cfg, scheduler_config))
        logger.info(kv_cache.describe_pool(self.spec, self.num_pages, max_model_len))
        self.kv_pages = kv_cache.allocate_kv_pool(self.spec, self.num_pages, self.backend,
                                                  self.mesh)
        self.pages_per_req = math.ceil(max_model_len / self.page_size)
        self.buckets = Buckets.create(scheduler_config.max_num_batched_tokens,
                                      scheduler_config.max_num_seqs,
                                      scheduler_config.token_padding_gap)
        self.input_batch = InputBatch(scheduler_config.max_num_seqs, max_model_len,
                                      self.pages_per_req, self.page_size)
        self.sampler = StepSampler(self.vocab_size, self.input_batch, self._inputs)
        self._launcher: ThreadPoolExecutor | None = None  # ``dispatch(background=True)``
        self._launch: Future | None = None  # the step on the launch thread, if any
        # (T, R, all_logits, decode_only, hidden) -> executable
        self._compiled: dict[tuple[int, int, bool, bool, bool], jax.stages.Compiled] = {}
        self.compile_seconds: dict[tuple[int, int, bool, bool, bool], float] = {}
        if compile_workers < 1:
            raise ValueError(f"compile_workers must be >= 1, got {compile_workers}.")
        self.compile_workers = compile_workers
        if compile_all_buckets is None:
            compile_all_buckets = jax.default_backend() != "cpu"
        if compile_all_buckets:
            self.precompile()

    @staticmethod
    def _activation_reserve(cfg, sc: SchedulerConfig) -> int:
        # Largest step: a few (T, max(D, F)) f32 intermediates plus (R, V) logits, with slack.
        hidden = getattr(cfg, "intermediate_size", 4 * getattr(cfg, "hidden_size", 1024))
        return int(4 * (8 * sc.max_num_batched_tokens * hidden + 4 * sc.max_num_seqs * cfg.vocab_size))

    # -- compilation --------------------------------------------------------------------------
    def _layout(self, bucket: tuple[int, int]) -> PackedLayout:
        T, R = bucket
        k = self.num_speculative_tokens
        # With drafts, a step's requests sample at up to min(T, R (1 + k)) positions: rounded
        # up to a power of two, so the sampler compiles for few row counts.
        rows = R if not k else max(R, min(T, 1 << (R * (1 + k) - 1).bit_length()))
        return PackedLayout(T, R, self.pages_per_req, rows)

    def _lower(self, key: tuple[int, int, bool, bool, bool]) -> jax.stages.Lowered:
        T, R, all_logits, decode_only, hidden = key
        layout = self._layout((T, R))
        fn = jax.jit(functools.partial(_forward, graphdef=self.graphdef, layout=layout,
                                       backend=self.backend, all_logits=all_logits,
                                       decode_only=decode_only, hidden=hidden, mesh=self.mesh,
                                       state_treedef=self.state_treedef),
                     donate_argnums=(1,))
        packed = jax.ShapeDtypeStruct((layout.total,), jnp.int32, sharding=self._inputs)
        return fn.lower(self.params, self.kv_pages, packed, self.sampler.last_sampled)

    def _executable(self, bucket: tuple[int, int], all_logits: bool = False,
                    decode_only: bool = False, hidden: bool = False):
        key = (*bucket, all_logits, decode_only, hidden)
        exe = self._compiled.get(key)
        if exe is None:
            start = time.perf_counter()
            exe = self._compiled[key] = self._lower(key).compile()
            self.compile_seconds[key] = time.perf_counter() - start
        return exe

    def precompile(self) -> None:
        """AOT-compiles every (T, R) bucket and the common sampler variants.

        With ``compile_workers`` > 1 the buckets are traced and lowered one by one (Python,
        under the GIL) and XLA compiles them on that many threads at once (it releases the
        GIL); ``compile_seconds`` then holds each compile's own span, not its share."""
        start = time.perf_counter()
        pairs = self.buckets.pairs()
        keys = [(*b, False, False, False) for b in pairs]
        keys += [(*self.buckets.pick(r, r), False, True, False)  # decode-only: R requests
                 for r in self.buckets.req_buckets]
        keys = [k for k in dict.fromkeys(keys) if k not in self._compiled]

        def compile_one(item):
            key, lowered = item
            t0 = time.perf_counter()
            return key, lowered.compile(), time.perf_counter() - t0

        if self.compile_workers > 1:
            with ThreadPoolExecutor(self.compile_workers, thread_name_prefix="jaxpage-compile") as pool:
                done = list(pool.map(compile_one, ((k, self._lower(k)) for k in keys)))
        else:
            done = [compile_one((k, self._lower(k))) for k in keys]
        for key, exe, seconds in done:
            self._compiled[key], self.compile_seconds[key] = exe, seconds
        self.sampler.precompile(sorted({self._layout(p).logits_rows for p in pairs}))
        logger.info("compiled %d step buckets in %.1f s (%d compile thread%s)", len(pairs),
                    time.perf_counter() - start, self.compile_workers,
                    "" if self.compile_workers == 1 else "s")

    # -- one step -----------------------------------------------------------------------------
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.dispatch(so))

    def collect(self, handle: "StepHandle") -> ModelRunnerOutput:
        """Waits for a dispatched step and reads its tokens (and logprobs) back."""
        if handle.launch is not None:  # launched on the launch thread: its errors raise here
            handle.sample, handle.prompt_logprobs, handle.hidden = handle.launch.result()
            handle.launch = None
        if handle.sample is None:
            return ModelRunnerOutput(sampled_token_ids={})
        result = self.sampler.collect(handle.sample, handle.hidden)
        self.sampler.collect_prompt_logprobs(handle.prompt_logprobs, result)
        return result

    def dispatch(self, so: SchedulerOutput, background: bool = False,
                 defer_sampling: bool = False) -> "StepHandle":
        """Launches one step on the device without waiting for it (async scheduling calls
        this for step N + 1 before it collects step N).

        With ``background`` the device calls (the step's executable, then the sampler's) are
        made on the runner's launch thread, and the handle carries their future: an
        executable's launch costs the host ~1 ms at batch 32 on an H200 (XLA updating and
        launching ~200 kernels; docs/benchmarks/NOTES.md, "Host time per step"), C++ work that
        releases the GIL, so the engine's Python for the step before (collect, stop checks,
        outputs) and the next schedule run meanwhile. Everything on the host (batch state,
        packed inputs, sampling metadata, pending counts) is still done here, in order.

        With ``defer_sampling`` (async scheduling with grammars) only the model step launches
        now; ``launch_sampling`` plans and launches the sampler later, once the engine has fed
        the step before's tokens to the grammars, whose masks this step's sampling needs."""
        self._wait_launch()
        self.input_batch.update(so)
        if so.total_num_scheduled_tokens == 0:
            return StepHandle(None, None)
        req_ids = packing_order(so.num_scheduled_tokens)
        bucket = self.buckets.pick(so.total_num_scheduled_tokens, len(req_ids))
        layout = self._layout(bucket)
        packed = self.input_batch.prepare(so, req_ids, layout)
        states = [self.input_batch.requests[r] for r in req_ids]
        counts = [so.num_scheduled_tokens[r] for r in req_ids]
        want_prompt_lp = any(s.sampling_params.prompt_logprobs is not None
                             and s.num_computed_tokens < s.num_prompt_tokens for s in states)
        drafts = [so.scheduled_spec_decode_tokens.get(r, []) for r in req_ids]
        # Only requests whose scheduled range reaches their last token (known or in flight)
        # sample.
        samples = [s.num_computed_tokens + c >= s.num_tokens + s.num_pending
                   for s, c in zip(states, counts)]
        want_hidden = any(do and s.sampling_params.return_hidden
                          for s, do in zip(states, samples))
        exe = self._executable(bucket, want_prompt_lp,
                               decode_only=so.total_num_scheduled_tokens == len(req_ids),
                               hidden=want_hidden)
        prompt_plan = (self.sampler.plan_prompt_logprobs(layout.num_tokens, states, counts)
                       if want_prompt_lp else None)

        def forward():
            logits, self.kv_pages, extras = exe(self.params, self.kv_pages,
                                                jax.device_put(packed, self._inputs),
                                                self.sampler.last_sampled)
            return (logits,
                    self.sampler.launch_prompt_logprobs(extras.get("all_logits"), prompt_plan),
                    extras.get("hidden"))

        if defer_sampling:
            deferred = (states, samples, layout.logits_rows, drafts)
            return StepHandle(None, None, launch=self._submit(forward), deferred=deferred)
        sample_plan = self.sampler.plan(states, samples, layout.logits_rows, drafts)

        def launch():
            logits, prompt, hidden = forward()
            return self.sampler.launch(logits, sample_plan), prompt, hidden

        if not background:
            return StepHandle(*launch())
        return StepHandle(None, None, launch=self._submit(launch))

    def launch_sampling(self, handle: "StepHandle") -> None:
        """The sampler of a step dispatched with ``defer_sampling``, planned now (the grammars
        have taken the tokens in flight) and launched on the launch thread after its model
        step. A request whose grammar is done (or broken) by now does not sample: the engine
        has finished it, and drops whatever this step computed for it."""
        states, samples, rows, drafts = handle.deferred
        samples = [do and (s.grammar is None or not (s.grammar.terminated or s.grammar.error))
                   for s, do in zip(states, samples)]
        plan = self.sampler.plan(states, samples, rows, drafts, grammars_current=True)
        forward, handle.deferred = handle.launch, None

        def launch():
            logits, prompt, hidden = forward.result()  # done: the thread runs them in order
            return self.sampler.launch(logits, plan), prompt, hidden

        handle.launch = self._submit(launch)

    def _submit(self, fn) -> Future:
        """Runs ``fn`` on the launch thread, after what it runs already."""
        if self._launcher is None:
            self._launcher = ThreadPoolExecutor(1, thread_name_prefix="jaxpage-launch")
        self._launch = self._launcher.submit(fn)
        return self._launch

    def _wait_launch(self) -> None:
        """Waits for the step on the launch thread, if any: the next one reads the pool and
        ``last_sampled`` it replaces. Its error, if it failed, is its handle's to raise."""
        launch, self._launch = self._launch, None
        if launch is not None:
            launch.exception()

    def shutdown(self) -> None:
        """Stops the launch thread (after the step on it, if any)."""
        self._wait_launch()
        if self._launcher is not None:
            self._launcher.shutdown(wait=True)
            self._launcher = None


@dataclass
class StepHandle:
    """A dispatched step: its sampler outputs (device arrays) and prompt logprobs, if any;
    or, launched in the background, the future that gives them."""

    sample: PendingSample | None
    prompt_logprobs: PendingPromptLogprobs | None
    hidden: jax.Array | None = None  # (rows, D) final hidden states (``return_hidden``)
    launch: Future | None = None
    # ``defer_sampling``: (states, samples, logits rows, drafts) until ``launch_sampling``
    deferred: tuple | None = None
