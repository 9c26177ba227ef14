"""Postgres notification queue monitoring (design, sections 4 and 7)."""

from __future__ import annotations

import json
import logging

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import http, publish, subscribe, unique_topic, wait_until

# pg_notification_queue_usage() counts whole 8 KiB queue pages out of about
# a million, so a few pages make it tiny but above zero.
TINY_THRESHOLD = 1e-7
PAGES_OF_NOTIFICATIONS = 6


async def fill_queue_pages(dsn: str, channel: str, pages: int) -> None:
    payload = "q" * 7000
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(pages):
            await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def queue_metric(body: bytes) -> float | None:
    for family in text_string_to_metric_families(body.decode("utf-8")):
        if family.name == "ssepg_notification_queue_usage":
            return float(family.samples[0].value)
    return None


@pytest.mark.gen_test(timeout=90)
@pytest.mark.allow_warnings
async def test_queue_usage_polled_exposed_and_warned_about(services, pg_dsn, caplog):
    caplog.set_level(logging.INFO, logger="ssepg.broker")
    a = await services.start(
        dsn=pg_dsn, queue_poll_interval=0.1, queue_warn_threshold=TINY_THRESHOLD
    )
    broker = a.service.broker
    await wait_until(lambda: broker.queue_usage is not None, message="first poll")
    polls = [0]
    poll = broker.monitor.queue_usage

    async def counted_poll() -> float:
        polls[0] += 1
        return await poll()

    broker.monitor.queue_usage = counted_poll
    # Another session listens and then sits in an open transaction: it cannot
    # take notifications, so the queue keeps them all.
    channel = "held_" + unique_topic().replace("-", "_")
    holder = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    try:
        await holder.execute(f"LISTEN {channel}")
        await holder.set_autocommit(False)
        await holder.execute("SELECT 1")
        await fill_queue_pages(pg_dsn, channel, PAGES_OF_NOTIFICATIONS)
        await wait_until(lambda: (broker.queue_usage or 0) > 0, message="usage above 0")
        await wait_until(
            lambda: any(
                r.levelno == logging.WARNING and "notification queue" in r.getMessage()
                for r in caplog.records
            ),
            message="queue warning",
        )
        response = await http("GET", a.url("/healthz"))
        assert response.code == 200
        reported = json.loads(response.body)["pg_notification_queue_usage"]
        assert 0 < reported < 0.01
        metrics = await http("GET", a.url("/metrics"))
        assert 0 < queue_metric(metrics.body) < 0.01
        # Publishing and delivery go on while the queue fills.
        topic = unique_topic()
        client = await subscribe(a, topic)
        await publish(a, topic, "while full")
        assert (await client.wait_events(1))[0].json == "while full"
        client.close()
        # Several polls later, still one warning: it is not repeated per poll.
        seen = polls[0]
        await wait_until(lambda: polls[0] >= seen + 3, message="three more polls")
    finally:
        await holder.rollback()
        await holder.close()
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "notification queue" in r.getMessage()
    ]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "%" in text and "full" in text
    # Released, and with more traffic moving the queue's tail, usage drops
    # and the all-clear is logged.
    await fill_queue_pages(pg_dsn, channel, PAGES_OF_NOTIFICATIONS)
    await wait_until(lambda: broker.queue_usage == 0, message="usage back to 0")
    await wait_until(
        lambda: any("back to" in r.getMessage() for r in caplog.records),
        message="all-clear logged",
    )


async def ssepg_sessions(dsn: str) -> dict[int, str]:
    """Backend pid to last query of every ssepg session on the database."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'ssepg'"
        )
        return dict(await cur.fetchall())


@pytest.mark.gen_test(timeout=60)
async def test_queue_poll_runs_on_its_own_connection(services, pg_dsn):
    before = set(await ssepg_sessions(pg_dsn))
    a = await services.start(dsn=pg_dsn, queue_poll_interval=0.1)
    broker = a.service.broker
    topic = unique_topic()
    await publish(a, topic, 1)
    await wait_until(lambda: broker.queue_usage is not None)
    sessions: dict[int, str] = {}

    async def all_three_seen() -> bool:
        sessions.clear()
        found = await ssepg_sessions(pg_dsn)
        sessions.update({pid: q for pid, q in found.items() if pid not in before})
        queries = list(sessions.values())
        return any("pg_notification_queue_usage" in q for q in queries) and any(
            "pg_notify" in q for q in queries
        )

    await wait_until(all_three_seen, message="monitor and publisher sessions seen")
    (monitor,) = [p for p, q in sessions.items() if "pg_notification_queue_usage" in q]
    publishers = {p for p, q in sessions.items() if "pg_notify" in q} - {monitor}
    assert publishers, "no publish session found"
    assert monitor != broker.listener_pid
    assert broker.listener_pid in sessions
    # A poll stuck on its connection holds up neither publishing nor
    # delivery.
    client = await subscribe(a, topic)
    async with broker.monitor._lock:  # noqa: SLF001 - stands for a stuck poll
        await publish(a, topic, "during a stuck poll")
        assert (await client.wait_events(1))[0].json == "during a stuck poll"
    client.close()
