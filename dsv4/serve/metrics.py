"""Prometheus metrics of the server (one registry per app): queue and running requests, cache usage,
token counters (tokens/s = rate()), TTFT / TPOT / end-to-end latency histograms, finished requests by
reason."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


def _used(load: dict, what: str) -> float:
    return 1 - load[f"free_{what}"] / max(1, load[what])


class ServerMetrics:
    def __init__(self, engine):
        self.engine = engine
        r = self.registry = CollectorRegistry()
        Gauge("dsv4_num_requests_waiting", "Requests queued for admission", registry=r).set_function(
            lambda: engine.load()["waiting"])
        Gauge("dsv4_num_requests_running", "Requests holding a cache slot", registry=r).set_function(
            lambda: engine.load()["running"])
        Gauge("dsv4_kv_cache_usage", "Fraction of KV cache pages in use", registry=r).set_function(
            lambda: _used(engine.load(), "pages"))
        Gauge("dsv4_kv_cache_slots_usage", "Fraction of request slots in use", registry=r).set_function(
            lambda: _used(engine.load(), "slots"))
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("dsv4_generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.finished = Counter("dsv4_requests_finished", "Finished requests", ["finish_reason"], registry=r)
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "Time to first token", buckets=_LAT, registry=r)
        self.tpot = Histogram("dsv4_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_TPOT, registry=r)
        self.e2e = Histogram("dsv4_e2e_request_latency_seconds", "Arrival to finish", buckets=_LAT, registry=r)
        self.http_errors = Counter("dsv4_http_errors", "Error responses", ["status"], registry=r)
        # speculative decoding (finished requests): acceptance rate = accepted / draft tokens; mean accepted
        # length per step = (accepted + steps) / steps
        self.spec_steps = Counter("dsv4_spec_decode_steps", "Steps that verified drafts", registry=r)
        self.spec_drafts = Counter("dsv4_spec_decode_draft_tokens", "Draft tokens verified", registry=r)
        self.spec_accepted = Counter("dsv4_spec_decode_accepted_tokens", "Draft tokens accepted", registry=r)

        # prefix caching (finished requests, tokens): hit rate = hits / queries
        self.prefix_queries = Counter("dsv4_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("dsv4_prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r)

    def observe(self, out) -> None:
        m = out.metrics
        self.prefix_queries.inc(m.num_prompt_tokens)
        self.prefix_hits.inc(m.num_cached_tokens)
        self.prompt_tokens.inc(m.num_prompt_tokens)
        self.generation_tokens.inc(m.num_generated_tokens)
        self.finished.labels(out.outputs[0].finish_reason or "unknown").inc()
        if m.num_spec_steps:
            self.spec_steps.inc(m.num_spec_steps)
            self.spec_drafts.inc(m.num_draft_tokens)
            self.spec_accepted.inc(m.num_accepted_tokens)
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.tpot is not None:
            self.tpot.observe(m.tpot)
        if m.latency is not None:
            self.e2e.observe(m.latency)

    def render(self) -> bytes:
        return generate_latest(self.registry)
