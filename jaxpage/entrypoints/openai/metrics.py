"""``/metrics`` in the Prometheus text format: the engine's gauges and counters, responses by
route and status, and histograms of latency and token counts."""

from __future__ import annotations

from jaxpage.outputs import RequestOutput


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count) of seconds or token counts."""

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        name = f"jaxpage:{self.name}"
        out = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}",
                      f"{name}_count {self.count}"]


_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (1, 8, 32, 128, 512, 2048, 8192, 32768)


class ServerMetrics:
    """What the server counts itself (the engine's own counters come from its stats)."""

    def __init__(self):
        self.num_requests: dict[str, int] = {}
        self.histograms = {
            "ttft": Histogram("time_to_first_token_seconds", "Arrival to first output token.",
                              _LATENCY_BUCKETS),
            "e2e": Histogram("e2e_request_latency_seconds", "Arrival to the last token of "
                             "finished requests.", _LATENCY_BUCKETS),
            "prompt": Histogram("request_prompt_tokens", "Prompt tokens per finished request.",
                                _TOKEN_BUCKETS),
            "generation": Histogram("request_generation_tokens", "Generated tokens per "
                                    "finished request (all n completions).", _TOKEN_BUCKETS)}

    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        if m is not None and m.first_token_time is not None:
            self.histograms["ttft"].observe(m.first_token_time - m.arrival_time)
        if m is not None and m.finished_time is not None:
            self.histograms["e2e"].observe(m.finished_time - m.arrival_time)
        self.histograms["prompt"].observe(len(out.prompt_token_ids))
        self.histograms["generation"].observe(sum(len(c.token_ids) for c in out.outputs))

    def count(self, route: str, status: int) -> None:
        key = f'route="{route}",status="{status}"'
        self.num_requests[key] = self.num_requests.get(key, 0) + 1


def render_metrics(stats: dict[str, float], metrics: ServerMetrics) -> str:
    """Prometheus text format: engine gauges and counters, and requests by route and status."""
    lines = []

    def metric(name: str, kind: str, help_: str, value: float) -> None:
        lines.extend([f"# HELP jaxpage:{name} {help_}", f"# TYPE jaxpage:{name} {kind}",
                      f"jaxpage:{name} {value}"])

    metric("num_requests_running", "gauge", "Requests in the running batch.",
           stats.get("num_running", 0))
    metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
           stats.get("num_waiting", 0))
    metric("kv_cache_usage_perc", "gauge", "Fraction of KV pages in use.",
           stats.get("kv_cache_usage", 0.0))
    metric("num_free_pages", "gauge", "KV pages held by no request.",
           stats.get("num_free_pages", 0))
    metric("num_preemptions_total", "counter", "Requests preempted (recomputed).",
           stats.get("num_preemptions", 0))
    metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix "
           "cache.", stats.get("prefix_cache_queries", 0))
    metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
           stats.get("prefix_cache_hits", 0))
    metric("spec_decode_num_draft_tokens_total", "counter", "Draft tokens run (speculative "
           "decoding).", stats.get("spec_decode_num_draft_tokens", 0))
    metric("spec_decode_num_accepted_tokens_total", "counter", "Draft tokens kept (speculative "
           "decoding).", stats.get("spec_decode_num_accepted_tokens", 0))
    metric("engine_steps_total", "counter", "Engine steps run.", stats.get("num_steps", 0))
    lines += ["# HELP jaxpage:http_requests_total HTTP requests by route and status.",
              "# TYPE jaxpage:http_requests_total counter"]
    lines += [f"jaxpage:http_requests_total{{{k}}} {v}"
              for k, v in sorted(metrics.num_requests.items())]
    for histogram in metrics.histograms.values():
        lines += histogram.lines()
    return "\n".join(lines) + "\n"
