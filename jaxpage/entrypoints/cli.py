"""``jaxpage generate | chat | serve | bench`` on the default model or ``--model``, and
``jaxpage convert`` (a checkpoint in the models' own layout, for fast starts)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from jaxpage.config import KV_CACHE_DTYPES, LOAD_FORMATS, EngineArgs


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), an HF directory, a .gguf file or "
                        "a checkpoint of `jaxpage convert`")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--token-padding-gap", type=int, default=0,
                   help="0: steps pad to powers of two; g: to powers of two up to g, then to "
                        "multiples of g (less padding, more compiled buckets)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="launch step N + 1 before reading step N's tokens back, so that host "
                        "work overlaps the device's (default on; --no-async-scheduling: off)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="devices the model splits over (by heads and MLP width)")
    g.add_argument("--compile-workers", type=int, default=1,
                   help="XLA compiles at once while every bucket compiles at start-up")
    g.add_argument("--speculative-config", type=_json_object, default=None,
                   help='speculative decoding, vLLM\'s JSON: \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\' (drafts from '
                        "the context's own n-grams; the engine then steps synchronously)")
    g.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV page (default: 64 on GPU, 16 elsewhere)")
    g.add_argument("--num-pages", type=int, default=None)
    g.add_argument("--kv-cache-dtype", default="auto", choices=sorted(KV_CACHE_DTYPES),
                   help="KV pool dtype: auto (the model's) or fp8 / fp8_e4m3 / fp8_e5m2 (one "
                        "byte per value: twice the pages, half the attention reads)")
    g.add_argument("--calculate-kv-scales", action="store_true",
                   help="fp8 KV pool: per-layer K/V scales, computed on the first step")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--attention-backend", default="auto", choices=["auto", "reference", "pallas"])
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compilation-cache-dir", default=None,
                   help="JAX persistent compilation cache (default ~/.cache/jaxpage/xla; '' turns it off)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)


def _engine_args(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(model=ns.model, dtype=ns.dtype, load_format=ns.load_format,
                      max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
                      max_num_batched_tokens=ns.max_num_batched_tokens,
                      token_padding_gap=ns.token_padding_gap, block_size=ns.block_size,
                      async_scheduling=ns.async_scheduling,
                      tensor_parallel_size=ns.tensor_parallel_size,
                      compile_workers=ns.compile_workers,
                      speculative_config=ns.speculative_config,
                      num_pages=ns.num_pages, kv_cache_dtype=ns.kv_cache_dtype,
                      calculate_kv_scales=ns.calculate_kv_scales,
                      gpu_memory_utilization=ns.gpu_memory_utilization,
                      attention_backend=ns.attention_backend,
                      enable_prefix_caching=ns.enable_prefix_caching, seed=ns.seed,
                      compilation_cache_dir=ns.compilation_cache_dir)


def _run_generate(ns: argparse.Namespace, chat: bool) -> int:
    from jaxpage import LLM, SamplingParams

    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                            top_k=ns.top_k)
    args = _engine_args(ns)
    llm = LLM(**vars(args))
    if chat:
        messages = []
        if ns.system:
            messages.append({"role": "system", "content": ns.system})
        messages.append({"role": "user", "content": ns.message})
        out = llm.chat(messages, params, use_tqdm=False)[0]
    else:
        out = llm.generate(ns.prompt, params, use_tqdm=False)[0]
    print(out.outputs[0].text.strip() if chat else out.outputs[0].text)
    return 0


def _run_serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from jaxpage import LLM
    from jaxpage.entrypoints.openai.server import app_for_llm

    def exit_cleanly(signum, frame):
        raise SystemExit(0)

    # SIGTERM exits with status 0: at once while the model loads, and after the drain below
    # once serving (uvicorn re-raises the signal it caught, under this handler).
    signal.signal(signal.SIGTERM, exit_cleanly)
    if ns.enable_auto_tool_choice and not ns.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (e.g. hermes).")
    llm = LLM(**vars(_engine_args(ns)))
    app = app_for_llm(llm, model_name=ns.served_model_name or ns.model,
                      api_key=ns.api_key or None, max_body_bytes=ns.max_body_bytes,
                      drain_timeout_s=ns.drain_timeout,
                      tool_call_parser=ns.tool_call_parser if ns.enable_auto_tool_choice else None)
    # uvicorn stops taking connections on SIGTERM / SIGINT, waits for the open ones, then runs
    # the app's shutdown, which drains the engine (refusing new requests with 503 meanwhile).
    uvicorn.run(app, host=ns.host, port=ns.port, log_level="info" if ns.verbose else "warning",
                timeout_graceful_shutdown=int(ns.drain_timeout) + 5)
    return 0


def _run_convert(ns: argparse.Namespace) -> int:
    import time

    from jaxpage.default_model import resolve_model
    from jaxpage.models.checkpoint import convert

    t0 = time.perf_counter()
    out = convert(resolve_model(ns.source), ns.output, dtype=ns.dtype, tokenizer=ns.tokenizer)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {ns.dtype}) in {time.perf_counter() - t0:.1f} s; "
          f"load it with --model {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpage", description="LLM inference on JAX with paged attention")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine start-up")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt")
    gen.add_argument("prompt")
    chat = sub.add_parser("chat", help="answer one chat message with the model's chat template")
    chat.add_argument("message")
    chat.add_argument("--system", default=None, help="optional system message")
    for p in (gen, chat):
        _add_engine_args(p)
        _add_sampling_args(p)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to bind (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("JAXPAGE_API_KEY"),
                       help="required as 'Authorization: Bearer KEY' on every route but /health "
                            "(default: $JAXPAGE_API_KEY; none: no check)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: the --model argument)")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 2**20)
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds requests in flight may take to finish after SIGTERM")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="serve tool_choice='auto' (needs --tool-call-parser)")
    from jaxpage.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS
    serve.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_CALL_PARSERS),
                       help="the model's tool-call format (hermes: Qwen2.5 / Qwen3 / Hermes)")
    _add_engine_args(serve)
    conv = sub.add_parser(
        "convert", help="write a model as a jaxpage checkpoint (orbax, the models' own layout): "
                        "later starts skip name mapping and GGUF dequantization, and tensor-"
                        "parallel starts read each device's slice straight from disk")
    conv.add_argument("source", help="'default', an HF directory or a .gguf file")
    conv.add_argument("output", help="a new (or empty) directory")
    conv.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                      help="the dtype stored (a load in another dtype casts on restore)")
    conv.add_argument("--tokenizer", default=None,
                      help="a directory to take the tokenizer from instead of the source")
    from jaxpage.entrypoints import bench
    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import that torch is absent; jaxpage only uses its tokenizers.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    ns = build_parser().parse_args(argv)
    logging.getLogger("jaxpage").setLevel(logging.INFO if ns.verbose else logging.WARNING)
    try:
        if ns.command in ("generate", "chat"):
            return _run_generate(ns, chat=ns.command == "chat")
        if ns.command == "serve":
            return _run_serve(ns)
        if ns.command == "convert":
            return _run_convert(ns)
        if ns.command == "bench":
            from jaxpage.entrypoints import bench
            return bench.main(ns)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # User-facing errors: one clear line, no traceback from deep inside JAX.
        print(f"jaxpage: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
