"""Online serving benchmark against any OpenAI-compatible server (ours, vLLM's, SGLang's).

Sends ``--num-prompts`` random token-id prompts (``--input-len`` tokens, ``--output-len`` tokens
out with ``ignore_eos``) to ``/v1/completions`` with streaming, at ``--request-rate`` requests/s
(Poisson arrivals; ``inf`` sends them all at once), at most ``--max-concurrency`` in flight. It
measures what vLLM's ``benchmark_serving`` reports: time to first token (TTFT), time per output
token after the first (TPOT), inter-token latency between streamed chunks (ITL), end-to-end
latency, and request / token throughput; prints the summary and writes JSON.

    jaxpage serve --model preset... &      # or: vllm serve ...
    python tools/bench_serving.py --base-url http://127.0.0.1:8000 --model default \\
        --input-len 1024 --output-len 128 --num-prompts 200 --request-rate 8 --out r.json

``--launch`` starts jaxpage's server in this process instead (a preset shape with random
weights, ``preset:llama3.2-1b``, or any model path), on a free local port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def one_request(client, url: str, model: str, prompt: list[int], output_len: int,
                      extra: dict) -> RequestResult:
    body = dict(model=model, prompt=prompt, max_tokens=output_len, temperature=0.0,
                ignore_eos=True, stream=True, stream_options={"include_usage": True}, **extra)
    result = RequestResult(ok=False, prompt_len=len(prompt))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):  # new tokens (text may be empty: half a character,
                    # or a model served without a tokenizer)
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.ok = result.output_len > 0
        if not result.ok:
            result.error = "no usage chunk (completion_tokens) in the stream"
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"[:200]
    return result


async def run(base_url: str, model: str, prompts: list[list[int]], output_len: int,
              request_rate: float, max_concurrency: int | None, seed: int,
              extra: dict | None = None) -> tuple[list[RequestResult], float]:
    import httpx

    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(max_concurrency or len(prompts))
    limits = httpx.Limits(max_connections=max_concurrency or len(prompts))
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        async def limited(prompt):
            async with limit:
                return await one_request(client, base_url, model, prompt, output_len,
                                         extra or {})

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.ensure_future(limited(prompt)))
            if math.isfinite(request_rate):
                await asyncio.sleep(rng.exponential(1.0 / request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda xs, q: float(np.percentile(xs, q) * 1e3) if len(xs) else float("nan")  # noqa: E731
    mean = lambda xs: float(np.mean(xs) * 1e3) if len(xs) else float("nan")  # noqa: E731
    ttft = [r.ttft for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.latency for r in ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    summary = dict(
        completed=len(ok), failed=len(results) - len(ok), duration_s=duration,
        total_input_tokens=in_tokens, total_output_tokens=out_tokens,
        request_throughput=len(ok) / duration, output_throughput=out_tokens / duration,
        total_token_throughput=(in_tokens + out_tokens) / duration,
        errors=sorted({r.error for r in results if not r.ok})[:5])
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2e)):
        summary.update({f"mean_{name}_ms": mean(xs), f"median_{name}_ms": ms(xs, 50),
                        f"p99_{name}_ms": ms(xs, 99)})
    return summary


def print_summary(s: dict) -> None:
    print("{s:{c}^60}".format(s=" Serving Benchmark Result ", c="="))
    rows = [("Successful requests:", s["completed"]), ("Failed requests:", s["failed"]),
            ("Benchmark duration (s):", f"{s['duration_s']:.2f}"),
            ("Total input tokens:", s["total_input_tokens"]),
            ("Total generated tokens:", s["total_output_tokens"]),
            ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")]
    for name, label in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token "
                                                          "(excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        rows.append((f"---{label}---", None))
        rows += [(f"{k.capitalize()} {name.upper()} (ms):", f"{s[f'{k}_{name}_ms']:.2f}")
                 for k in ("mean", "median", "p99")]
    for label, value in rows:
        print(label if value is None else f"{label:<40}{value:>20}")
    if s["errors"]:
        print("errors:", *s["errors"], sep="\n  ")
    print("=" * 60)


def launch(model: str, engine_kwargs: dict):
    """jaxpage's server in a background thread of this process; returns (url, name, stop)."""
    import socket
    import threading

    import uvicorn

    from jaxpage import LLM
    from jaxpage.entrypoints.bench import PRESETS
    from jaxpage.entrypoints.openai.server import app_for_llm

    if model.startswith("preset:"):
        kw = dict(model=None, load_format="dummy", hf_config=PRESETS[model.split(":", 1)[1]])
    else:
        kw = dict(model=model)
    llm = LLM(**kw, **engine_kwargs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app_for_llm(llm, model_name=model), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(60)

    return f"http://127.0.0.1:{port}", model, llm.loaded.config.vocab_size, stop


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default=None, help="a running server (else --launch)")
    p.add_argument("--model", default="default", help="the model name the server serves")
    p.add_argument("--launch", default=None,
                   help="start jaxpage's server here on this model (preset:NAME or a path)")
    p.add_argument("--engine-kwargs", default="{}", help="JSON EngineArgs for --launch")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="prompt token ids are drawn below this (default: the launched model's)")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and dropped) first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON result path")
    args = p.parse_args(argv)
    if (args.base_url is None) == (args.launch is None):
        p.error("give exactly one of --base-url and --launch")
    stop = None
    vocab = args.vocab_size
    if args.launch:
        url, model, launched_vocab, stop = launch(args.launch, json.loads(args.engine_kwargs))
        vocab = vocab or launched_vocab
    else:
        url, model = args.base_url.rstrip("/"), args.model
        if vocab is None:
            p.error("--vocab-size is needed with --base-url")
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(100, vocab - 100, args.input_len).tolist()
               for _ in range(args.num_prompts + args.warmup)]
    try:
        if args.warmup:
            asyncio.run(run(url, model, prompts[:args.warmup], args.output_len, float("inf"),
                            None, args.seed))
        results, duration = asyncio.run(run(url, model, prompts[args.warmup:], args.output_len,
                                            args.request_rate, args.max_concurrency,
                                            args.seed))
    finally:
        if stop is not None:
            stop()
    summary = summarize(results, duration)
    print_summary(summary)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(config=vars(args), summary=summary,
                           requests=[asdict(r) for r in results]), f, indent=1, default=str)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
