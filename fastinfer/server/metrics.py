"""Prometheus metrics of the server, under vLLM's names with a ``fastinfer:`` prefix, each series
labelled by ``model_name`` and ``model_version`` so that a canary can be compared with its stable
version on one dashboard.

The app calls ``first_token`` / ``tokens`` as a request streams, ``finished`` once it ends,
``engine_stats`` from a periodic poll of each engine (``routing`` too for an engine made of replicas,
``fastinfer.ray_serve``), and ``remove`` when a version is unloaded.
"""
from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LABELS = ("model_name", "model_version")

# Request-level latencies span a cached one-token reply (~1 ms) to a long generation under load
# (minutes); the bucket edges follow vLLM's roughly logarithmic spacing.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# One decode step: from ~1 ms (small model, batch 1) to seconds (preempted, swapped back in).
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                       0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)

# Finish reasons that count as a served request; "abort" and "error" do not.
SUCCESS_REASONS = frozenset({"stop", "length"})


class ServerMetrics:
    """The server's metrics in one ``CollectorRegistry`` (a fresh one when ``registry`` is None,
    so that several apps or tests in one process do not collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg, labels = self.registry, LABELS
        self.ttft = Histogram("fastinfer:time_to_first_token_seconds", "Time to first token in seconds.",
                              labels, buckets=LATENCY_BUCKETS, registry=reg)
        self.inter_token = Histogram("fastinfer:inter_token_latency_seconds",
                                     "Time between consecutive generated tokens in seconds.",
                                     labels, buckets=INTER_TOKEN_BUCKETS, registry=reg)
        self.e2e = Histogram("fastinfer:e2e_request_latency_seconds",
                             "End-to-end request latency in seconds.", labels,
                             buckets=LATENCY_BUCKETS, registry=reg)
        self.queue_time = Histogram("fastinfer:request_queue_time_seconds",
                                    "Time a request waited before its first schedule, in seconds.",
                                    labels, buckets=LATENCY_BUCKETS, registry=reg)
        # prometheus_client appends "_total" to a Counter's name when it exposes it.
        self.prompt_tokens = Counter("fastinfer:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=reg)
        self.generation_tokens = Counter("fastinfer:generation_tokens", "Tokens generated.", labels,
                                         registry=reg)
        self.request_success = Counter("fastinfer:request_success",
                                       "Requests finished with reason stop or length.",
                                       labels + ("finish_reason",), registry=reg)
        self.num_preemptions = Counter("fastinfer:num_preemptions", "Requests preempted by the scheduler.",
                                       labels, registry=reg)
        self.num_running = Gauge("fastinfer:num_requests_running", "Requests in the running batch.",
                                 labels, registry=reg)
        self.num_waiting = Gauge("fastinfer:num_requests_waiting", "Requests waiting to be scheduled.",
                                 labels, registry=reg)
        self.kv_cache_usage = Gauge("fastinfer:kv_cache_usage_perc",
                                    "Fraction of KV-cache blocks in use (0 to 1).", labels, registry=reg)
        self.prefix_cache_queries = Counter("fastinfer:prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.", labels, registry=reg)
        self.prefix_cache_hits = Counter("fastinfer:prefix_cache_hits",
                                         "Prompt tokens found in the prefix cache.", labels, registry=reg)
        self.kv_offload_blocks = Gauge("fastinfer:kv_offload_blocks",
                                       "Host-tier (offloaded) KV-cache blocks in use.", labels, registry=reg)
        self.kv_offload_blocks_total = Gauge("fastinfer:kv_offload_blocks_total",
                                             "Host-tier (offloaded) KV-cache blocks in all.", labels, registry=reg)
        self.num_swapped = Gauge("fastinfer:num_swapped", "Sequences swapped out to the host tier.",
                                 labels, registry=reg)
        # Engine stats -> the gauge set to the value, or the counter grown by its difference.
        self._gauges = {"num_running": self.num_running, "num_waiting": self.num_waiting,
                        "kv_offload_blocks": self.kv_offload_blocks,
                        "kv_offload_blocks_total": self.kv_offload_blocks_total, "num_swapped": self.num_swapped}
        self._cumulative = {"num_preemptions": self.num_preemptions,
                            "prefix_cache_queries": self.prefix_cache_queries,
                            "prefix_cache_hits": self.prefix_cache_hits}
        self._seen: dict[tuple[str, str, str], int] = {}  # (model, version, stat): its last cumulative value
        self._add_spec_metrics(reg, labels)
        self._add_router_metrics(reg, labels)
        self._replicas: dict[tuple[str, str], set[str]] = {}
        self._finish_reasons: dict[tuple[str, str], set[str]] = {}

    def _add_spec_metrics(self, reg: CollectorRegistry, labels: tuple[str, ...]) -> None:
        """Speculative decoding's counts (engines with a ``speculative_config``), under vLLM's
        names: the acceptance rate is accepted over draft tokens; the mean accepted length,
        1 + accepted tokens over drafts."""
        for stat, name, doc in (("spec_num_drafts", "num_drafts", "Verifications of at least one draft token."),
                                ("spec_draft_tokens", "num_draft_tokens", "Draft tokens verified."),
                                ("spec_accepted_tokens", "num_accepted_tokens", "Draft tokens accepted.")):
            self._cumulative[stat] = Counter(f"fastinfer:spec_decode_{name}", doc, labels, registry=reg)
        self._gauges["spec_acceptance_rate"] = Gauge("fastinfer:spec_decode_acceptance_rate",
                                                     "Draft tokens accepted over draft tokens verified.", labels,
                                                     registry=reg)
        self._gauges["spec_mean_accepted_length"] = Gauge("fastinfer:spec_decode_mean_accepted_length",
                                                          "Tokens per verification: 1 + accepted drafts per "
                                                          "verification.", labels, registry=reg)

    def _add_router_metrics(self, reg: CollectorRegistry, labels: tuple[str, ...]) -> None:
        """The series of engines made of replicas (fastinfer.ray_serve): the router's counts and
        each replica's load."""
        self.router_requests = Counter("fastinfer:router_requests", "Requests routed between replicas, by decision "
                                       "(prefix, balanced, fallback, random).", labels + ("decision",), registry=reg)
        self.router_hits = Counter("fastinfer:router_prefix_hits", "Routed requests sent to a replica that held "
                                   "part of their prompt.", labels, registry=reg)
        self.router_hit_rate = Gauge("fastinfer:router_prefix_hit_rate", "Fraction of routed requests sent to a "
                                     "replica that held part of their prompt.", labels, registry=reg)
        self.replica_in_flight = Gauge("fastinfer:replica_requests_in_flight", "Requests the router has in flight "
                                       "on each replica.", labels + ("replica",), registry=reg)
        self.replica_running = Gauge("fastinfer:replica_num_running", "Requests in each replica's running batch.",
                                     labels + ("replica",), registry=reg)
        self.replica_waiting = Gauge("fastinfer:replica_num_waiting", "Requests waiting in each replica.",
                                     labels + ("replica",), registry=reg)

    def first_token(self, model: str, version: str, ttft_s: float | None) -> None:
        """Record a request's time to first token (skipped when None)."""
        if ttft_s is not None:
            self.ttft.labels(model, version).observe(ttft_s)

    def tokens(self, model: str, version: str, n_tokens: int, gap_s: float | None) -> None:
        """Record a streamed delta of ``n_tokens`` tokens that came ``gap_s`` after the previous
        one: the gap is shared evenly, one inter-token observation per token."""
        if gap_s is None or n_tokens <= 0:
            return
        child, per_token = self.inter_token.labels(model, version), gap_s / n_tokens
        for _ in range(n_tokens):
            child.observe(per_token)

    def finished(self, model: str, version: str, *, queue_time_s: float | None, e2e_s: float | None,
                 prompt_tokens: int | None, generation_tokens: int | None,
                 finish_reason: str | None) -> None:
        """Record a request that ended. Tokens count whatever the ending; the success counter
        only counts ``stop`` and ``length``."""
        if queue_time_s is not None:
            self.queue_time.labels(model, version).observe(queue_time_s)
        if e2e_s is not None:
            self.e2e.labels(model, version).observe(e2e_s)
        if prompt_tokens:
            self.prompt_tokens.labels(model, version).inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.labels(model, version).inc(generation_tokens)
        if finish_reason in SUCCESS_REASONS:
            self.request_success.labels(model, version, finish_reason).inc()
            self._finish_reasons.setdefault((model, version), set()).add(finish_reason)

    def engine_stats(self, model: str, version: str, stats: Mapping[str, int | None]) -> None:
        """Set the gauges from an engine's snapshot (``num_running``, ``num_waiting``,
        ``kv_blocks_total``, ``kv_blocks_free``, ``kv_offload_blocks``,
        ``kv_offload_blocks_total``, ``num_swapped``; missing or None values are skipped) and
        grow the counters of its cumulative counts (``num_preemptions``,
        ``prefix_cache_queries``, ``prefix_cache_hits``) by the difference since the previous
        snapshot of this version (by the whole count if the engine restarted)."""
        for stat, gauge in self._gauges.items():
            if stats.get(stat) is not None:
                gauge.labels(model, version).set(stats[stat])
        total, free = stats.get("kv_blocks_total"), stats.get("kv_blocks_free")
        if total and free is not None:
            self.kv_cache_usage.labels(model, version).set((total - free) / total)
        for stat, counter in self._cumulative.items():
            if stats.get(stat) is not None:
                self._count_cumulative(model, version, stat, counter.labels(model, version), stats[stat])

    def _count_cumulative(self, model: str, version: str, stat: str, child: Counter,
                          cumulative: int | None) -> None:
        """Grows ``child`` (a counter's series, created at 0 if new) by what the engine's
        cumulative ``stat`` added since last seen."""
        if cumulative is None:
            return
        previous = self._seen.get((model, version, stat), 0)
        delta = cumulative - previous if cumulative >= previous else cumulative
        self._seen[(model, version, stat)] = cumulative
        if delta:
            child.inc(delta)

    def routing(self, model: str, version: str, stats: Mapping) -> None:
        """Set the router's series from its snapshot (``ReplicaSetClient.routing_stats``):
        cumulative ``decisions``, ``hit_rate``, ``in_flight`` per replica and the replicas' own
        reports (``replicas``: name -> stats). Series of replicas that are gone are dropped."""
        for decision, count in stats.get("decisions", {}).items():
            self._count_cumulative(model, version, "router:" + decision,
                                   self.router_requests.labels(model, version, decision), count)
        self._count_cumulative(model, version, "router-hits", self.router_hits.labels(model, version),
                               stats.get("hits", 0))
        self.router_hit_rate.labels(model, version).set(stats.get("hit_rate", 0.0))
        replicas, in_flight = stats.get("replicas", {}), stats.get("in_flight", {})
        for name in self._replicas.get((model, version), set()) - set(replicas):
            self._drop_replica(model, version, name)
        self._replicas[(model, version)] = set(replicas)
        for name, report in replicas.items():
            self.replica_in_flight.labels(model, version, name).set(in_flight.get(name, 0))
            self.replica_running.labels(model, version, name).set(report.get("num_running", 0))
            self.replica_waiting.labels(model, version, name).set(report.get("num_waiting", 0))

    def _drop_replica(self, model: str, version: str, name: str) -> None:
        for gauge in (self.replica_in_flight, self.replica_running, self.replica_waiting):
            gauge.remove(model, version, name)

    def remove(self, model: str, version: str) -> None:
        """Drop every series of an unloaded version, so that it stops being exported."""
        for metric in (self.ttft, self.inter_token, self.e2e, self.queue_time, self.prompt_tokens,
                       self.generation_tokens, self.kv_cache_usage, *self._gauges.values(),
                       *self._cumulative.values()):
            metric.remove(model, version)  # a label set never seen is ignored
        for reason in self._finish_reasons.pop((model, version), ()):
            self.request_success.remove(model, version, reason)
        for stat in self._cumulative:
            self._seen.pop((model, version, stat), None)
        self.router_hit_rate.remove(model, version)
        self.router_hits.remove(model, version)
        self._seen.pop((model, version, "router-hits"), None)
        for key in [k for k in self._seen if k[:2] == (model, version) and k[2].startswith("router:")]:
            del self._seen[key]
            self.router_requests.remove(model, version, key[2].removeprefix("router:"))
        for name in self._replicas.pop((model, version), set()):
            self._drop_replica(model, version, name)

    def render(self) -> tuple[bytes, str]:
        """The exposition text of every metric and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
