"""Prometheus metrics of a service (prometheus-client, one registry per
service so several services can live in one process).

Figures are read from the dispatcher and the broker at scrape time, so the
hot path counts nothing twice; only the publish latency is observed as it
happens.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .service import Service

__all__ = ["Metrics", "LATENCY_BUCKETS_S"]

# Publish latency buckets in seconds: a NOTIFY round trip on a LAN takes well
# under a millisecond; anything near publish_timeout is an outage.
LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Metrics:
    """Figures of one service for ``GET /metrics``. Belongs to the service
    that created it and lives as long as it does."""

    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        # Counted here and handed to prometheus-client at scrape time: an
        # observation is one bisect and one increment, cheaper than the
        # client's locked histogram at tens of thousands of publishes a
        # second.
        self._latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._latency_sum = 0.0
        self.listener_transitions = 0
        self.listener_losses = 0
        self.registry.register(_ServiceCollector(service, self))
        ProcessCollector(registry=self.registry)

    def observe_publish(self, seconds: float) -> None:
        """Record one publish the broker took after *seconds*."""
        self._latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self._latency_sum += seconds

    def publish_latency(self) -> HistogramMetricFamily:
        """The publish latency histogram as prometheus-client exposes it."""
        buckets = []
        total = 0
        # The last count (above every bound) goes only into +Inf.
        for bound, count in zip(
            LATENCY_BUCKETS_S, self._latency_counts[:-1], strict=True
        ):
            total += count
            buckets.append((repr(bound), total))
        buckets.append(("+Inf", total + self._latency_counts[-1]))
        return HistogramMetricFamily(
            "ssepg_publish_latency_seconds",
            "Time from a publish call until the broker took the event.",
            buckets=buckets,
            sum_value=self._latency_sum,
        )

    def listener_changed(self, is_up: bool) -> None:
        """Called by the broker whenever its listener comes up or goes down."""
        self.listener_transitions += 1
        if not is_up:
            self.listener_losses += 1

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format *accept* asks for (Prometheus text
        by default, OpenMetrics on request) and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _ServiceCollector(Collector):
    def __init__(self, service: Service, metrics: Metrics) -> None:
        self._service = service
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        service = self._service
        broker = service.broker
        totals = service.dispatcher.stats(0)["totals"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        info = GaugeMetricFamily(
            "ssepg_instance",
            "Always 1; the labels name this instance and its broker.",
            labels=["instance_id", "broker"],
        )
        info.add_metric([service.instance_id, broker.kind], 1)
        yield info
        yield self._metrics.publish_latency()
        yield gauge(
            "ssepg_subscribers",
            "Open subscriptions (SSE streams and in-process).",
            totals["subscribers"],
        )
        yield gauge("ssepg_streams", "Open SSE streams.", totals["streams"])
        yield gauge(
            "ssepg_topics", "Topics held (each with a replay window).", totals["topics"]
        )
        yield gauge(
            "ssepg_idle_topics",
            "Topics without subscribers or traffic for topic_idle_timeout.",
            totals["idle_topics"],
        )
        yield gauge(
            "ssepg_dispatch_depth",
            "Events heard but not yet fanned out.",
            totals["dispatch_depth"],
        )
        yield gauge(
            "ssepg_pending_to_clients_bytes",
            "Bytes accepted for subscribers not yet taken by their sockets.",
            totals["pending_to_clients"],
        )
        yield gauge(
            "ssepg_window_memory_bytes",
            "Bytes held by replay windows.",
            totals["total_memory_usage_bytes"],
        )
        yield counter(
            "ssepg_events_published",
            "Events published through this instance.",
            totals["published"],
        )
        yield counter(
            "ssepg_events_received",
            "Events heard from the broker.",
            totals["received"],
        )
        yield counter(
            "ssepg_events_broadcast",
            "Events fanned out to this instance's subscribers (or, for a topic "
            "without any, stored in its window).",
            totals["broadcast"],
        )
        yield counter(
            "ssepg_frames_delivered",
            "Event frames written in full to subscribers.",
            totals["delivered_frames"],
        )
        yield counter(
            "ssepg_dropped_clients",
            "Subscribers disconnected as too slow.",
            totals["dropped_clients"],
        )
        yield counter(
            "ssepg_ring_overwrites",
            "Events pushed out of full replay windows.",
            totals["ring_overwrites"],
        )
        yield counter(
            "ssepg_duplicate_events",
            "Copies of events already heard, dropped (a publish retried after "
            "its connection was lost may commit twice).",
            totals["duplicates"],
        )
        yield counter(
            "ssepg_removed_topics",
            "Idle topics removed by the memory cleanup.",
            totals["removed_topics"],
        )
        yield counter(
            "ssepg_bad_envelopes",
            "Notifications skipped as malformed.",
            broker.bad_envelopes,
        )
        yield gauge(
            "ssepg_listener_up",
            "1 while the broker's listener is connected, else 0.",
            1 if broker.is_connected else 0,
        )
        yield counter(
            "ssepg_listener_losses",
            "Times the listener connection was lost.",
            self._metrics.listener_losses,
        )
        yield counter(
            "ssepg_listener_reconnects",
            "Listener reconnect attempts.",
            broker.reconnect_attempts,
        )
        usage = broker.queue_usage
        if usage is not None:
            # Only the Postgres broker has a queue; absent rather than a
            # made-up number on the in-process one.
            yield gauge(
                "ssepg_notification_queue_usage",
                "pg_notification_queue_usage() at the last poll (0..1).",
                usage,
            )
        yield gauge(
            "ssepg_draining",
            "1 while the service drains.",
            1 if service.is_draining else 0,
        )
