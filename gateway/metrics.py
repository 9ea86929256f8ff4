"""Prometheus metrics of one gateway process (its own registry, so tests can run several gateways in one process).

Names are prefixed `sovereign_gateway_`; deploy/grafana/sovereign-gateway.json charts them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
AUDIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "sovereign_gateway_"
        self.requests = Counter(p + "requests", "Requests answered, by team, model and HTTP status.",
                                ["team", "model", "status"], registry=r)
        self.latency = Histogram(p + "request_seconds", "Whole request latency as the client sees it.",
                                 ["model", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(p + "ttft_seconds", "Time to the first upstream byte of the answer.", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter(p + "tokens", "Tokens billed, by team, model and kind (prompt/completion).",
                              ["team", "model", "kind"], registry=r)
        self.quota_rejections = Counter(p + "quota_rejections", "Requests refused by a quota.", ["team", "kind"],
                                        registry=r)
        self.upstream_errors = Counter(p + "upstream_errors", "Upstream failures by replica and kind.",
                                       ["replica", "kind"], registry=r)
        self.policy_events = Counter(p + "policy_events", "Policy decisions: pii_redacted, pii_blocked, "
                                     "pii_refused (a tool schema's property name with personal data), pii_failed "
                                     "(a PII rule ran past its time budget), injection_flagged, injection_blocked, "
                                     "max_tokens_capped, network_refused (a key used from outside its networks).",
                                     ["team", "kind"], registry=r)
        self.audit_write = Histogram(p + "audit_write_seconds", "Time until an audit record was durable.",
                                     buckets=AUDIT_BUCKETS, registry=r)
        self.overhead = Histogram(p + "overhead_seconds", "Time the gateway itself spent on a request (not waiting "
                                  "on the upstream or the audit log).", buckets=OVERHEAD_BUCKETS, registry=r)
        self.inflight = Gauge(p + "inflight_requests", "Requests in flight through this process.", registry=r)
        self.replica_outstanding = Gauge(p + "replica_outstanding", "Requests in flight per replica.", ["replica"],
                                         registry=r)
        self.replica_healthy = Gauge(p + "replica_healthy", "1 if the replica answered its last health check.",
                                     ["replica"], registry=r)

        self.pii_rules_reloads = Counter(p + "pii_rules_reloads", "Changes to the PII rules file, by result: "
                                         "applied, or refused (the kinds before stay in force).", ["result"],
                                         registry=r)
        self.pii_rules_refused = Gauge(p + "pii_rules_refused", "1 while the PII rules file on disk is refused and "
                                       "the rules loaded before it stay in force.", registry=r)
        self.pii_rules_kinds = Gauge(p + "pii_rules_kinds", "The organisation's own PII kinds in force.", registry=r)

        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels: str):
        """`metric.labels(*labels)`, cached: prometheus-client's own lookup costs more than the request path wants."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def render(self) -> bytes:
        return generate_latest(self.registry)
