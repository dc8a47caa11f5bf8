"""Prometheus metrics under vLLM's names, so dashboards, alerts and autoscalers (KEDA, the
Prometheus adapter behind an HPA) written for vLLM work unchanged.

Every series carries ``model_name`` like vLLM's. Counters are declared without the
``_total`` suffix because the client library appends it on exposition. A private registry per
engine keeps tests and benchmarks that build several engines in one process apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class ServingMetrics:
    """The engine's metrics; children are pre-bound to the model name so the hot path does
    no label lookups."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name=model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name=model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name=model_name)

        self.num_requests_running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.num_preemptions = counter("vllm:num_preemptions", "Requests preempted (to be recomputed).")
        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds",
                                             "Time from arrival to the first generated token.", TTFT_BUCKETS)
        self.inter_token_latency = histogram("vllm:inter_token_latency_seconds",
                                             "Time between consecutive generated tokens.", ITL_BUCKETS)
        self.e2e_request_latency = histogram("vllm:e2e_request_latency_seconds",
                                             "Time from arrival to the last token.", E2E_BUCKETS)
        self._success = Counter("vllm:request_success", "Requests finished, by reason (stop, length).",
                                ["model_name", "finished_reason"], registry=r)
        self._model_name = model_name

    def request_success_for(self, reason: str) -> Counter:
        return self._success.labels(model_name=self._model_name, finished_reason=reason)


class CaptureMetrics:
    """The flywheel's capture series (``docs/flywheel.md``), in the engine's registry so that
    one ``/metrics`` scrape has them. Every label value is bound up front: an alert on
    ``capture_dropped_total{reason="store_error"}`` needs the series to exist at 0."""

    def __init__(self, model_name: str, registry: CollectorRegistry) -> None:
        r = registry
        records = Counter("kubeforge:capture_records", "Captured records committed to the store, by kind.",
                          ["model_name", "kind"], registry=r)
        nbytes = Counter("kubeforge:capture_bytes", "Bytes of committed capture shards, by kind.",
                         ["model_name", "kind"], registry=r)
        dropped = Counter("kubeforge:capture_dropped", "Captured records lost: queue_full (the in-memory queue "
                          "was full), store_error (their shard could not be written) or shutdown (offered "
                          "once the drain began, or still queued when it ran out of time).",
                          ["model_name", "reason"], registry=r)
        self.records = {k: records.labels(model_name=model_name, kind=k) for k in ("requests", "feedback")}
        self.bytes = {k: nbytes.labels(model_name=model_name, kind=k) for k in ("requests", "feedback")}
        self.dropped = {k: dropped.labels(model_name=model_name, reason=k)
                        for k in ("queue_full", "store_error", "shutdown")}
        self.profile_prompts = Counter("kubeforge:prompt_profile_prompts", "Prompts added to the live prompt "
                                       "profile (every prompt, sampled or not).", ["model_name"],
                                       registry=r).labels(model_name=model_name)
