"""The gateway's own Prometheus metrics (`/metrics`), beside the exporter's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own (`/metrics`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pipeq_gateway_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pipeq_gateway_request_seconds",
            "Time to answer (to the first byte of an event stream), by route template",
            ["route"],
            buckets=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
            ),
            registry=self.registry,
        )
        self.open_streams = Gauge(
            "pipeq_gateway_open_event_streams",
            "Server-sent event streams open now",
            registry=self.registry,
        )
        self.waiting = Gauge(
            "pipeq_gateway_waiting_requests",
            "Requests waiting for a job's result now (Prefer: wait, ?wait=)",
            registry=self.registry,
        )
