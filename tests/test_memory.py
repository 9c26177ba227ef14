"""Memory management: passive topics cost only their window, idle topics go,
and memory pressure shrinks the windows of topics without subscribers first
(design, section 8)."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import psutil
import psycopg
import pytest

from ssepg.broker import build_envelope, channel_for

from support import publish, subscribe, unique_topic, wait_until

MiB = 1024 * 1024


async def notify_many(dsn: str, events: list[tuple[str, str, bytes]]) -> None:
    """Send envelopes from a session of our own, as another instance would,
    all in one statement."""
    channels = [channel_for(topic, 8) for topic, _, _ in events]
    payloads = [
        build_envelope(topic, event_id, "message", data).decode("utf-8")
        for topic, event_id, data in events
    ]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "SELECT count(pg_notify(c, p)) FROM unnest(%s::text[], %s::text[]) AS t(c, p)",
            (channels, payloads),
        )


@pytest.mark.gen_test(timeout=90)
async def test_passive_topics_cost_no_task_timer_or_channel(services, pg_dsn):
    # The queue poll sleeps through the test, so that the service's own
    # background tasks stay the same while the topics arrive.
    a = await services.start(dsn=pg_dsn, ring_capacity=8, queue_poll_interval=3600)
    await wait_until(lambda: a.service.broker.queue_usage is not None)
    d = a.service.dispatcher
    loop = asyncio.get_running_loop()
    tasks_before = len(asyncio.all_tasks())
    # asyncio keeps its timers in this heap; nothing public counts them.
    timers_before = len(loop._scheduled)  # noqa: SLF001
    prefix = unique_topic("passive")
    topics = [f"{prefix}-{i}" for i in range(1000)]
    events = [(t, f"other-{i}", b'{"i":%d}' % i) for i, t in enumerate(topics)]
    # One topic hears more than its window holds: the window stays bounded.
    busy = topics[0]
    events += [(busy, f"other-busy-{n}", b'{"n":%d}' % n) for n in range(50)]
    await notify_many(pg_dsn, events)
    await wait_until(lambda: d.received == len(events), message="every event heard")
    assert len(asyncio.all_tasks()) == tasks_before
    assert len(loop._scheduled) <= timers_before + 3  # noqa: SLF001
    assert all(t in d.topics for t in topics)
    for name in topics:
        t = d.topics[name]
        assert t.channel is None
        assert not t.is_queued
        assert not t.python_subs and not t.multi_channels
        assert t.fanned == t.ring.head  # nothing waits to be fanned out
    assert len(d.topics[busy].ring) == 8
    report = a.service.health()
    assert report["totals"]["dispatch_depth"] == 0
    assert report["totals"]["broadcast"] == len(events)
    # The windows are what the memory figures count, and they are bounded.
    assert report["totals"]["total_memory_usage_bytes"] < 1000 * 8 * 1024


@pytest.mark.gen_test(timeout=60)
async def test_idle_topic_removed_on_cleanup_interval(services, pg_dsn, caplog):
    caplog.set_level(logging.INFO, logger="ssepg.hub")
    a = await services.start(
        dsn=pg_dsn, memory_cleanup_interval=0.2, topic_idle_timeout=0.5
    )
    d = a.service.dispatcher
    kept, idle = unique_topic("kept"), unique_topic("idle")
    client = await subscribe(a, kept)
    await publish(a, kept, 1)
    await publish(a, idle, {"pad": "x" * 500})
    await client.wait_events(1)
    await wait_until(lambda: idle not in d.topics, message="idle topic removed")
    # A topic with a subscriber stays however quiet it is.
    assert kept in d.topics
    lines = [r.getMessage() for r in caplog.records if "idle topic" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("removed 1 idle topic")
    assert re.search(r"freed \d+(\.\d)? (B|KiB)$", lines[0]), lines[0]
    assert a.service.health()["totals"]["topics"] == 1
    # Once its subscriber leaves, the other one goes too.
    client.close()
    await wait_until(lambda: kept not in d.topics, message="second topic removed")
    lines = [r.getMessage() for r in caplog.records if "idle topic" in r.getMessage()]
    assert len(lines) == 2
    # A resume into a removed topic cannot be complete: it says so.
    late = await subscribe(a, idle, headers={"Last-Event-ID": "gone-1"})
    await wait_until(lambda: any(e.event == "ssepg-reset" for e in late.events))
    late.close()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.allow_warnings
async def test_memory_pressure_shrinks_windows_without_subscribers_first(
    services, pg_dsn, caplog
):
    caplog.set_level(logging.INFO, logger="ssepg.hub")
    # The smallest threshold allowed; any Python process running this suite
    # holds more, so the service is under pressure from the start.
    a = await services.start(
        dsn=pg_dsn, ring_capacity=64, memory_pressure_threshold=16 * MiB
    )
    assert psutil.Process().memory_info().rss > 16 * MiB
    d = a.service.dispatcher
    watched, quiet1, quiet2 = unique_topic("w"), unique_topic("q"), unique_topic("q")
    client = await subscribe(a, watched)
    ids = {}
    for topic in (watched, quiet1, quiet2):
        ids[topic] = [
            await a.service.publish(topic, {"n": n, "pad": "p" * 300})
            for n in range(64)
        ]
    await client.wait_events(64)
    await wait_until(lambda: d.received == 192)
    before = {t["topic"]: t for t in a.service.health()["topics"]}

    done = a.service.run_cleanup()
    assert done["shrunk_topics"] == 2
    assert d.topics[quiet1].ring.capacity == d.topics[quiet2].ring.capacity == 32
    assert d.topics[watched].ring.capacity == 64
    after = {t["topic"]: t for t in a.service.health()["topics"]}
    for topic in (quiet1, quiet2):
        assert after[topic]["memory_usage_bytes"] < before[topic]["memory_usage_bytes"]
        assert after[topic]["window_events"] == 32
    assert after[watched]["memory_usage_bytes"] == before[watched]["memory_usage_bytes"]
    freed = sum(
        before[t]["memory_usage_bytes"] - after[t]["memory_usage_bytes"]
        for t in (quiet1, quiet2)
    )
    assert done["freed_bytes"] == freed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "memory pressure" in warnings[0]
    assert "2 topics without subscribers" in warnings[0]

    # A resume from an event the shrink let go announces the hole.
    old = d.subscribe(quiet1, last_event_id=ids[quiet1][5])
    first = await asyncio.wait_for(old.__anext__(), 10)
    assert first.event == "ssepg-reset"
    old.close()

    # Down to one event each, then the windows with subscribers shrink,
    # never below 16 events.
    for _ in range(10):
        a.service.run_cleanup()
    assert d.topics[quiet1].ring.capacity == 1
    assert d.topics[watched].ring.capacity == 16
    assert any("with subscribers" in r.getMessage() for r in caplog.records)
    # The stream went on untouched.
    await publish(a, watched, "still here")
    events = await client.wait_events(65)
    assert events[-1].data == json.dumps("still here")

    # Pressure gone: windows get their capacity back, logged once.
    a.service.config = a.service.config.replace(memory_pressure_threshold=1 << 40)
    caplog.clear()
    a.service.run_cleanup()
    assert {d.topics[t].ring.capacity for t in (watched, quiet1, quiet2)} == {64}
    lines = [r.getMessage() for r in caplog.records]
    assert len([x for x in lines if "memory pressure over" in x]) == 1
    a.service.run_cleanup()
    assert (
        len([r for r in caplog.records if "memory pressure over" in r.getMessage()])
        == 1
    )
    client.close()
