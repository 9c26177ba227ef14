"""Health report, routes, the health port and the startup security line
(design, sections 2, 7 and 10)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import psutil
import psycopg
import pytest
import tornado
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ssepg import Config, ConfigError, Service

from support import (
    SSEClient,
    dsn_with_dbname,
    http,
    publish,
    subscribe,
    unique_topic,
    wait_until,
)

TOP_LEVEL = {
    "status",
    "now",
    "instance_id",
    "python_version",
    "tornado_version",
    "pid",
    "rss_bytes",
    "tasks",
    "last_notification_at",
    "pg_notification_queue_usage",
    "listen_connected",
    "reconnect_attempts",
    "totals",
    "topics",
}
TOTALS = {
    "topics",
    "subscribers",
    "dispatch_depth",
    "pending_to_clients",
    "published",
    "broadcast",
    "delivered_frames",
    "dropped_clients",
    "ring_overwrites",
    "total_memory_usage_bytes",
    "idle_topics",
}
PER_TOPIC = {
    "topic",
    "subscribers",
    "dispatch_depth",
    "pending_to_clients",
    "published",
    "broadcast",
    "delivered_frames",
    "dropped_clients",
    "memory_usage_bytes",
    "last_activity_unix",
    "is_idle",
}


async def health(running: Any, query: str = "") -> tuple[int, dict[str, Any]]:
    response = await http("GET", running.url("/healthz" + query))
    return response.code, json.loads(response.body)


async def metrics(running: Any) -> dict[str, float]:
    response = await http("GET", running.url("/metrics"))
    assert response.code == 200
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(response.body.decode())
        for sample in family.samples
    }


def topic_entry(report: dict[str, Any], topic: str) -> dict[str, Any]:
    entries = [t for t in report["topics"] if t["topic"] == topic]
    assert len(entries) == 1, f"{topic} not in the report"
    return entries[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def connections_refused(dsn: str) -> AsyncIterator[None]:
    """Refuse new connections to the test database (superusers included)
    until the block ends; existing sessions go on."""
    name = conninfo_to_dict(dsn)["dbname"]
    # A database cannot refuse connections while one names it as current.
    admin_dsn = dsn_with_dbname(dsn, "postgres")
    async with await psycopg.AsyncConnection.connect(
        admin_dsn, autocommit=True
    ) as admin:
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        try:
            yield
        finally:
            await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")


async def terminate_backend(dsn: str, pid: int) -> None:
    admin_dsn = dsn_with_dbname(dsn, "postgres")
    async with await psycopg.AsyncConnection.connect(
        admin_dsn, autocommit=True
    ) as admin:
        await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


# Routes ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
@pytest.mark.allow_warnings  # the 404 answers log WARNING access lines
async def test_base_path_and_healthz_are_configurable(services, pg_dsn):
    a = await services.start(dsn=pg_dsn, base_path="/sse/v1", healthz="/status")
    topic = unique_topic()
    client = await SSEClient(a.port, f"/sse/v1/{topic}/events").connect()
    assert client.status == 200
    sent = await http("POST", a.url(f"/sse/v1/{topic}/events"), {"data": 1})
    assert sent.code == 200
    batch = await http(
        "POST", a.url("/sse/v1"), {"events": [{"topic": topic, "data": 2}]}
    )
    assert batch.code == 200
    assert [e.data for e in await client.wait_events(2)] == ["1", "2"]
    assert (await http("GET", a.url("/status"))).code == 200
    assert (await http("GET", a.url("/metrics"))).code == 200
    for path in ("/healthz", f"/topics/{topic}/events"):
        assert (await http("GET", a.url(path))).code == 404, path
    assert (
        await http("POST", a.url(f"/topics/{topic}/events"), {"data": 1})
    ).code == 404
    client.close()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.allow_warnings  # the 404 answers log WARNING access lines
async def test_health_port_serves_health_and_metrics_alone(services, pg_dsn):
    port = free_port()
    a = await services.start(dsn=pg_dsn, health_port=port)
    side = f"http://127.0.0.1:{port}"
    response = await http("GET", side + "/healthz")
    assert response.code == 200
    assert json.loads(response.body)["status"] == "ok"
    metrics = await http("GET", side + "/metrics")
    assert metrics.code == 200 and b"ssepg_subscribers" in metrics.body
    # Gone from the main port, and the health port serves nothing else.
    assert (await http("GET", a.url("/healthz"))).code == 404
    assert (await http("GET", a.url("/metrics"))).code == 404
    topic = unique_topic()
    assert (await http("GET", side + f"/topics/{topic}/events")).code == 404
    assert (
        await http("POST", side + f"/topics/{topic}/events", {"data": 1})
    ).code == 404
    assert [r[0] for r in a.service.routes()] == ["/topics/([^/]*)/events", "/topics"]
    # The main port still does its work.
    await publish(a, topic, 1)


@pytest.mark.gen_test(timeout=60)
async def test_health_port_bind_failure_fails_start_with_config_error(pg_dsn):
    taken = socket.socket()
    taken.bind(("", 0))
    taken.listen()
    port = taken.getsockname()[1]
    tasks_before = len(asyncio.all_tasks())
    try:
        with pytest.raises(ConfigError) as info:
            await Service.start(Config(dsn=pg_dsn, health_port=port))
    finally:
        taken.close()
    assert info.value.field == "health_port"
    assert str(port) in str(info.value)
    # Nothing of the failed start stays behind.
    await wait_until(
        lambda: len(asyncio.all_tasks()) <= tasks_before,
        message="tasks of the failed start gone",
    )


def test_server_exits_2_naming_health_port_when_it_cannot_bind():
    taken = socket.socket()
    taken.bind(("", 0))
    taken.listen()
    port = taken.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSEPG_")}
    env.pop("DATABASE_URL", None)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ssepg", "--port", "0", "--health-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    finally:
        taken.close()
    assert result.returncode == 2
    assert f"cannot start: health_port: cannot listen on port {port}" in result.stderr
    assert "Traceback" not in result.stderr


# Startup security line -------------------------------------------------------


def security_lines(caplog: Any) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("security:")
    ]


@pytest.mark.gen_test(timeout=60)
async def test_security_line_warns_about_each_open_surface(services, caplog):
    caplog.set_level(logging.INFO, logger="ssepg")
    await services.start()
    lines = security_lines(caplog)
    assert len(lines) == 1
    line = lines[0]
    assert line.isascii() and line.isprintable()
    assert line.count("WARNING") == 3
    assert "no publish_token" in line
    assert "no listen_token" in line
    assert "health and metrics are served on the public port" in line


@pytest.mark.gen_test(timeout=60)
async def test_security_line_lists_what_is_protected(services, caplog):
    caplog.set_level(logging.INFO, logger="ssepg")
    await services.start(
        publish_token="p-1", listen_token="l-2", health_port=free_port()
    )
    (line,) = security_lines(caplog)
    assert "WARNING" not in line
    assert "publish (bearer token)" in line
    assert "subscribe (bearer token)" in line
    assert "separate port" in line


@pytest.mark.gen_test(timeout=90)
@pytest.mark.allow_warnings
async def test_no_secret_in_any_log_of_a_service_lifetime(services, pg_dsn, caplog):
    password = "Pw-7a1c-Secret"
    params = conninfo_to_dict(pg_dsn)
    # The test server trusts local connections, so a password in the DSN is
    # carried along but never checked.
    dsn = make_conninfo(**{**params, "password": password})
    url_dsn = (
        f"postgresql://{params.get('user', 'postgres')}:{password}@"
        f"{params.get('host', '127.0.0.1')}:{params.get('port', 5432)}/{params['dbname']}"
    )
    publish_token, listen_token = "Pub-Token-4411", "Lis-Token-9922"
    caplog.set_level(logging.DEBUG)
    for chosen in (dsn, url_dsn):
        a = await services.start(
            dsn=chosen, publish_token=publish_token, listen_token=listen_token
        )
        topic = unique_topic()
        client = await SSEClient(
            a.port, f"/topics/{topic}/events?access_token={listen_token}"
        ).connect()
        await http(
            "POST",
            a.url(f"/topics/{topic}/events"),
            {"data": 1},
            headers={"Authorization": f"Bearer {publish_token}"},
        )
        await client.wait_events(1)
        await http(
            "POST",
            a.url(f"/topics/{topic}/events"),
            {"data": 1},
            headers={"Authorization": f"Bearer {listen_token}"},
        )
        # A lost listener makes the broker log its reasons and reconnects.
        broker = a.service.broker
        await terminate_backend(pg_dsn, broker.listener_pid)
        await wait_until(lambda b=broker: b.reconnect_attempts >= 1)
        await wait_until(lambda b=broker: b.is_connected)
        client.close()
        await a.service.close(drain=0)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    text = "\n".join(formatter.format(r) for r in caplog.records)
    assert "on Postgres" in text and "security:" in text and "reconnect" in text
    for secret in (password, publish_token, listen_token):
        assert secret not in text


# Health report -----------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_health_report_has_the_full_schema_with_true_numbers(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    clients = [await subscribe(a, topic), await subscribe(a, topic)]
    started = time.time()
    for n in range(3):
        await publish(a, topic, {"n": n})
    for client in clients:
        await client.wait_events(3)
    await wait_until(lambda: b.service.dispatcher.received >= 3)
    await wait_until(lambda: a.service.broker.queue_usage is not None)
    await wait_until(
        lambda: a.service.health()["totals"]["delivered_frames"] == 6,
        message="delivered frames counted",
    )

    code, report = await health(a)
    assert code == 200
    assert set(report) >= TOP_LEVEL
    assert set(report["totals"]) >= TOTALS
    for entry in report["topics"]:
        assert set(entry) >= PER_TOPIC
    assert report["status"] == "ok"
    assert report["instance_id"] == a.service.instance_id
    assert report["pid"] == os.getpid()
    assert report["python_version"] == platform.python_version()
    assert report["tornado_version"] == tornado.version
    rss = psutil.Process().memory_info().rss
    assert abs(report["rss_bytes"] - rss) < 64 * 1024 * 1024
    assert report["tasks"] >= 1
    assert report["listen_connected"] is True
    assert report["reconnect_attempts"] == 0
    assert 0.0 <= report["pg_notification_queue_usage"] <= 1.0
    assert started - 1 <= report["last_notification_at"] <= time.time()
    assert abs(report["now"] - time.time()) < 5

    entry = topic_entry(report, topic)
    assert entry["subscribers"] == 2
    assert entry["published"] == 3
    assert entry["broadcast"] == 3
    assert entry["delivered_frames"] == 6
    assert entry["dispatch_depth"] == 0
    assert entry["pending_to_clients"] == 0
    assert entry["dropped_clients"] == 0
    assert entry["is_idle"] is False
    assert entry["memory_usage_bytes"] > 0
    assert started - 1 <= entry["last_activity_unix"] <= time.time()
    totals = report["totals"]
    assert totals["topics"] == len(report["topics"]) == 1
    assert totals["subscribers"] == 2
    assert totals["published"] == 3
    assert totals["broadcast"] == 3
    assert totals["delivered_frames"] == 6
    assert totals["total_memory_usage_bytes"] == entry["memory_usage_bytes"]
    assert totals["idle_topics"] == 0

    # The other instance heard the same events but published none of them.
    _, other = await health(b)
    other_entry = topic_entry(other, topic)
    assert (other_entry["published"], other_entry["broadcast"]) == (0, 3)
    assert other_entry["subscribers"] == 0
    assert other["totals"]["published"] == 0

    # The task count is the loop's.
    assert a.service.health()["tasks"] == len(asyncio.all_tasks())
    for client in clients:
        client.close()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.allow_warnings
async def test_health_degraded_while_postgres_unreachable(services):
    a = await services.start(
        dsn="postgresql://postgres@127.0.0.1:1/none", wait_listen=False
    )
    await wait_until(
        lambda: a.service.broker.reconnect_attempts >= 2,
        message="two reconnect attempts",
    )
    code, report = await health(a)
    assert code == 503
    assert report["status"] == "degraded"
    assert report["listen_connected"] is False
    assert report["reconnect_attempts"] >= 2
    assert report["last_notification_at"] is None


@pytest.mark.gen_test(timeout=90)
@pytest.mark.allow_warnings
async def test_health_degraded_during_listener_outage_then_ok(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    client = await subscribe(a, topic)
    broker = a.service.broker
    async with connections_refused(pg_dsn):
        await terminate_backend(pg_dsn, broker.listener_pid)
        await wait_until(
            lambda: broker.reconnect_attempts >= 2,
            message="reconnects refused by Postgres",
        )
        code, report = await health(a)
        assert code == 503
        assert report["status"] == "degraded"
        assert report["listen_connected"] is False
        attempts = report["reconnect_attempts"]
        assert attempts >= 2
        # Streams stay open through the outage.
        assert report["totals"]["subscribers"] == 1
        down = await metrics(a)
        assert down["ssepg_listener_up"] == 0
        assert down["ssepg_listener_losses_total"] == 1
        assert down["ssepg_listener_reconnects_total"] >= attempts
    await wait_until(lambda: broker.is_connected, message="listener back")
    code, report = await health(a)
    assert code == 200
    assert report["status"] == "ok"
    assert report["listen_connected"] is True
    assert report["reconnect_attempts"] >= attempts
    up = await metrics(a)
    assert up["ssepg_listener_up"] == 1
    assert up["ssepg_listener_losses_total"] == 1
    assert up["ssepg_listener_reconnects_total"] == report["reconnect_attempts"]
    await wait_until(
        lambda: any(e.event == "ssepg-gap" for e in client.events),
        message="gap signalled",
    )
    await publish(a, topic, {"after": True})
    assert (await client.wait_events(1))[0].json == {"after": True}
    client.close()


@pytest.mark.gen_test(timeout=60)
async def test_ring_overwrites_counted(services, pg_dsn):
    a = await services.start(dsn=pg_dsn, ring_capacity=4)
    topic = unique_topic()
    for n in range(10):
        await publish(a, topic, n)
    await wait_until(lambda: a.service.dispatcher.received == 10)
    _, report = await health(a)
    entry = topic_entry(report, topic)
    assert entry["ring_overwrites"] == 6
    assert entry["window_events"] == 4
    assert report["totals"]["ring_overwrites"] == 6


@pytest.mark.gen_test(timeout=60)
async def test_memory_figures_go_down_when_an_idle_topic_is_removed(services, pg_dsn):
    a = await services.start(dsn=pg_dsn, topic_idle_timeout=0.3)
    kept, idle = unique_topic("kept"), unique_topic("idle")
    client = await subscribe(a, kept)
    for n in range(20):
        await publish(a, kept, {"n": n, "pad": "x" * 200})
        await publish(a, idle, {"n": n, "pad": "y" * 400})
    await client.wait_events(20)
    await wait_until(
        lambda: topic_entry(a.service.health(), idle)["is_idle"], message="topic idle"
    )
    before = a.service.health()
    idle_bytes = topic_entry(before, idle)["memory_usage_bytes"]
    assert idle_bytes > 20 * 400
    assert before["totals"]["idle_topics"] == 1
    done = a.service.run_cleanup()
    assert done["removed_topics"] == 1
    _, after = await health(a)
    assert [t["topic"] for t in after["topics"]] == [kept]
    assert after["totals"]["topics"] == 1
    assert after["totals"]["idle_topics"] == 0
    assert after["totals"]["total_memory_usage_bytes"] == (
        before["totals"]["total_memory_usage_bytes"] - idle_bytes
    )
    client.close()


@pytest.mark.gen_test(timeout=60)
async def test_limit_gives_the_busiest_topics(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    busy = [unique_topic(f"busy{i}") for i in range(3)]
    passive = unique_topic("passive")
    clients = [await subscribe(a, t) for t in busy]
    for index, topic in enumerate(busy):
        for n in range(3 - index):
            await publish(a, topic, n)
    for n in range(5):
        await publish(a, passive, n)
    for index, client in enumerate(clients):
        await client.wait_events(3 - index)
    await wait_until(lambda: a.service.dispatcher.received == 11)
    _, top2 = await health(a, "?limit=2")
    assert [t["topic"] for t in top2["topics"]] == busy[:2]
    assert top2["totals"]["topics"] == 4
    _, everything = await health(a)
    assert [t["topic"] for t in everything["topics"]] == busy + [passive]
    _, none = await health(a, "?limit=0")
    assert none["topics"] == []
    for client in clients:
        client.close()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.allow_warnings
async def test_bad_limit_is_refused(services):
    a = await services.start()
    for query in ("?limit=-1", "?limit=abc", "?limit=1e3"):
        response = await http("GET", a.url("/healthz" + query))
        assert response.code == 400, query
