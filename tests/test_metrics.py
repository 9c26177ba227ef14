"""``GET /metrics``: Prometheus text whose values match what happened."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import http, publish, subscribe, unique_topic, wait_until


async def scrape(running: Any, accept: str | None = None) -> dict[str, float]:
    headers = {"Accept": accept} if accept else None
    response = await http("GET", running.url("/metrics"), headers=headers)
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse(response.body.decode("utf-8"))


def parse(text: str) -> dict[str, float]:
    """Sample name (with labels, if any) to value."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if sample.labels:
                key += (
                    "{"
                    + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    + "}"
                )
            values[key] = sample.value
    return values


@pytest.mark.gen_test(timeout=60)
async def test_publish_latency_is_measured_finer_than_the_loop_clock(
    services, pg_dsn, monkeypatch
):
    # uvloop's loop.time() moves in whole milliseconds; a Postgres round
    # trip here takes a fraction of one, which such a clock would record as
    # 0. The same coarse clock on the standard loop shows the figure does
    # not depend on it.
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "time", lambda: round(time.monotonic(), 3))
    a = await services.start(dsn=pg_dsn)
    observed: list[float] = []
    observe = a.service.metrics.observe_publish

    def record(seconds: float) -> None:
        observed.append(seconds)
        observe(seconds)

    monkeypatch.setattr(a.service.metrics, "observe_publish", record)
    topic = unique_topic()
    for n in range(20):
        await a.service.publish(topic, n)
    assert len(observed) == 20
    assert all(0 < s < a.service.config.publish_timeout for s in observed), observed


@pytest.mark.gen_test(timeout=60)
async def test_metrics_match_what_happened(services, pg_dsn):
    a = await services.start(dsn=pg_dsn, ring_capacity=4)
    topic, passive = unique_topic(), unique_topic()
    clients = [await subscribe(a, topic), await subscribe(a, topic)]
    inproc = a.service.dispatcher.subscribe(topic)
    for n in range(6):
        await publish(a, topic, {"n": n})
    await a.service.publish(passive, "one")
    await http("POST", a.url("/topics"), {"events": [{"topic": passive, "data": 2}]})
    for client in clients:
        await client.wait_events(6)
    await wait_until(lambda: a.service.dispatcher.received == 8)
    await wait_until(lambda: a.service.broker.queue_usage is not None)
    await wait_until(lambda: a.service.health()["totals"]["delivered_frames"] == 18)

    m = await scrape(a)
    assert m["ssepg_subscribers"] == 3
    assert m["ssepg_streams"] == 2
    assert m["ssepg_topics"] == 2
    assert m["ssepg_events_published_total"] == 8
    assert m["ssepg_events_received_total"] == 8
    assert m["ssepg_events_broadcast_total"] == 8
    # Six events to two streams and one in-process subscription.
    assert m["ssepg_frames_delivered_total"] == 18
    assert m["ssepg_dropped_clients_total"] == 0
    assert m["ssepg_ring_overwrites_total"] == 2
    assert m["ssepg_listener_up"] == 1
    assert m["ssepg_listener_reconnects_total"] == 0
    assert m["ssepg_listener_losses_total"] == 0
    assert m["ssepg_notification_queue_usage"] == a.service.broker.queue_usage
    assert m["ssepg_draining"] == 0
    assert m["ssepg_dispatch_depth"] == 0
    assert (
        m[f"ssepg_instance{{broker=postgres,instance_id={a.service.instance_id}}}"] == 1
    )
    # Every publish (single, in code, batch) is one latency observation.
    assert m["ssepg_publish_latency_seconds_count"] == 8
    assert (
        0
        < m["ssepg_publish_latency_seconds_sum"]
        < 8 * a.service.config.publish_timeout
    )
    buckets = sorted(
        (float(k.split("le=")[1].rstrip("}")), v)
        for k, v in m.items()
        if k.startswith("ssepg_publish_latency_seconds_bucket")
    )
    assert buckets[-1] == (float("inf"), 8)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert m["process_resident_memory_bytes"] > 0

    # The figures agree with the health report.
    totals = a.service.health()["totals"]
    assert m["ssepg_window_memory_bytes"] == totals["total_memory_usage_bytes"]
    assert m["ssepg_pending_to_clients_bytes"] == totals["pending_to_clients"]
    inproc.close()
    for client in clients:
        client.close()
    await wait_until(lambda: a.service.dispatcher.stream_count == 0)
    m = await scrape(a)
    assert m["ssepg_subscribers"] == 0


@pytest.mark.gen_test(timeout=60)
async def test_openmetrics_on_request(services):
    a = await services.start()
    response = await http(
        "GET", a.url("/metrics"), headers={"Accept": "application/openmetrics-text"}
    )
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.body.rstrip().endswith(b"# EOF")
    # No broker queue on the in-process broker: no made-up figure either.
    assert b"ssepg_notification_queue_usage" not in response.body
    assert b'broker="memory"' in response.body


@pytest.mark.gen_test(timeout=60)
async def test_frames_of_a_subscriber_that_lagged_are_counted_once_delivered(
    services, pg_dsn
):
    a = await services.start(dsn=pg_dsn, client_buffer=4 * 1024 * 1024)
    topic = unique_topic()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", a.port))
    await loop.sock_sendall(
        sock, f"GET /topics/{topic}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    await wait_until(lambda: a.service.dispatcher.stream_count == 1)
    # A narrow path: the server's socket buffer is small too, so the
    # subscriber falls behind after a few events.
    (sub,) = a.service.dispatcher.streams()
    sub.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    count = 120
    for n in range(count):
        await a.service.publish(topic, {"n": n, "pad": "z" * 1000})
    await wait_until(lambda: a.service.dispatcher.received == count)
    await wait_until(
        lambda: a.service.health()["totals"]["pending_to_clients"] > 0,
        message="the subscriber lagging",
    )
    received = bytearray()

    async def read_all() -> None:
        while received.count(b"\nid: ") + received.startswith(b"id: ") < count:
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, "stream closed early"
            received.extend(chunk)

    await asyncio.wait_for(read_all(), 30)
    assert received.count(b"event: message\n") == count
    await wait_until(
        lambda: a.service.health()["totals"]["delivered_frames"] == count,
        message="frames counted",
    )
    m = await scrape(a)
    assert m["ssepg_frames_delivered_total"] == count
    assert m["ssepg_pending_to_clients_bytes"] == 0
    sock.close()


@pytest.mark.gen_test(timeout=60)
async def test_delivered_frames_never_go_down_when_topics_are_removed(services, pg_dsn):
    a = await services.start(dsn=pg_dsn, topic_idle_timeout=0.2)
    topic = unique_topic()
    client = await subscribe(a, topic)
    for n in range(3):
        await publish(a, topic, n)
    await client.wait_events(3)
    client.close()
    await wait_until(lambda: a.service.dispatcher.stream_count == 0)
    await wait_until(lambda: a.service.health()["totals"]["idle_topics"] == 1)
    before = await scrape(a)
    assert before["ssepg_frames_delivered_total"] == 3
    assert a.service.run_cleanup()["removed_topics"] == 1
    after = await scrape(a)
    assert after["ssepg_topics"] == 0
    assert after["ssepg_removed_topics_total"] == 1
    # Counters are totals since start: removing a topic does not undo them.
    for name in (
        "ssepg_frames_delivered_total",
        "ssepg_events_broadcast_total",
        "ssepg_events_published_total",
    ):
        assert after[name] == before[name], name
