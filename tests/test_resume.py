"""Event ids and resume by ``Last-Event-ID``: on the same instance, on another
instance of the same database, across the seam between replay and live events,
and the ``ssepg-reset`` answer whenever a resume cannot be complete."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable

import psycopg
import pytest

from ssepg import Dispatcher

from support import SSEClient, http, publish, subscribe, unique_topic, wait_until


def _signals(client: SSEClient) -> list[tuple[str, str]]:
    return [(e.event, e.data) for e in client.events if e.event.startswith("ssepg-")]


async def _heard(running, event_id: str) -> None:
    # A publish is answered once Postgres took it, a moment before the
    # instances hear it back; an id an instance has not heard yet is unknown
    # to it (resume answers ssepg-reset), so tests wait for it.
    await wait_until(
        lambda: event_id in running.service.dispatcher._index,
        message=f"instance heard {event_id}",
    )


async def _publish_many(running, topic: str, count: int, start: int = 0) -> list[str]:
    """Publish ``{"n": start}`` onwards and wait until *running* heard them."""
    ids = []
    for n in range(start, start + count):
        ids.append((await publish(running, topic, {"n": n}))["id"])
    await _heard(running, ids[-1])
    return ids


@pytest.mark.gen_test(timeout=60)
async def test_every_event_carries_its_id_and_resume_replays_what_followed(
    services, pg_dsn
):
    a = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    first = await subscribe(a, topic)
    ids = await _publish_many(a, topic, 3)
    events = await first.wait_events(3)
    assert [e.id for e in events] == ids
    assert len(set(ids)) == 3 and all(
        i.startswith(a.service.instance_id + "-") for i in ids
    )
    first.close()

    missed = await _publish_many(a, topic, 4, start=3)
    resumed = await subscribe(a, topic, {"Last-Event-ID": ids[0]})
    events = await resumed.wait_events(6)
    assert [e.id for e in events] == ids[1:] + missed
    assert [e.json["n"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert _signals(resumed) == []

    live = await publish(a, topic, {"n": 7})
    events = await resumed.wait_events(7)
    assert [e.id for e in events] == ids[1:] + missed + [live["id"]]
    resumed.close()


@pytest.mark.gen_test(timeout=60)
async def test_resume_from_the_newest_id_replays_nothing_and_goes_live(
    services, pg_dsn
):
    a = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    ids = await _publish_many(a, topic, 2)
    client = await subscribe(a, topic, {"Last-Event-ID": ids[-1]})
    live = await publish(a, topic, {"n": 2})
    events = await client.wait_events(1)
    assert [e.id for e in client.data_events()] == [live["id"]]
    assert events[0].json == {"n": 2}
    assert _signals(client) == []
    client.close()


@pytest.mark.gen_test(timeout=60)
async def test_resume_on_another_instance_that_had_no_subscriber(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    client = await subscribe(a, topic)
    ids = await _publish_many(a, topic, 3)
    await client.wait_events(3)
    client.close()
    missed = await _publish_many(a, topic, 2, start=3) + await _publish_many(
        b, topic, 2, start=5
    )

    # b never had a subscriber of the topic, yet keeps its window.
    await _heard(b, missed[-1])
    report = b.service.health()
    [row] = [t for t in report["topics"] if t["topic"] == topic]
    assert row["subscribers"] == 0
    assert row["window_events"] == 7

    resumed = await subscribe(b, topic, {"Last-Event-ID": ids[-1]})
    events = await resumed.wait_events(4)
    assert [e.id for e in events] == missed
    assert [e.json["n"] for e in events] == [3, 4, 5, 6]
    live = await publish(a, topic, {"n": 7})
    events = await resumed.wait_events(5)
    assert [e.id for e in events] == missed + [live["id"]]
    assert _signals(resumed) == []
    resumed.close()


@pytest.mark.gen_test(timeout=60)
async def test_query_parameter_resumes_and_the_header_wins_over_it(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    ids = await _publish_many(a, topic, 4)

    by_query = await subscribe(a, topic, query=f"?last_event_id={ids[1]}")
    assert [e.id for e in await by_query.wait_events(2)] == ids[2:]
    by_query.close()

    both = await subscribe(
        a, topic, {"Last-Event-ID": ids[2]}, query=f"?last_event_id={ids[0]}"
    )
    assert [e.id for e in await both.wait_events(1)] == ids[3:]

    # A stale query parameter never adds a reset when the header is good.
    stale = await subscribe(
        a, topic, {"Last-Event-ID": ids[3]}, query="?last_event_id=unknown-1"
    )
    live = await publish(a, topic, {"n": 4})
    assert [e.id for e in await stale.wait_events(1)] == [live["id"]]
    assert [e.id for e in await both.wait_events(2)] == [ids[3], live["id"]]
    assert _signals(stale) == [] and _signals(both) == []
    both.close()
    stale.close()


@pytest.mark.gen_test(timeout=60)
async def test_unknown_id_answers_reset_first_then_live_events(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    await _publish_many(a, topic, 2)
    client = await subscribe(a, topic, {"Last-Event-ID": "zzzzzzzz-12345"})
    live = await publish(a, topic, {"n": 2})
    await client.wait_events(1)
    assert [(e.event, e.id) for e in client.events] == [
        ("ssepg-reset", None),
        ("message", live["id"]),
    ]
    assert client.events[0].json == {"topic": topic}
    client.close()


@pytest.mark.gen_test(timeout=60)
async def test_overwritten_id_answers_reset_and_replays_nothing(services, pg_dsn):
    a = await services.start(dsn=pg_dsn, ring_capacity=4)
    topic = unique_topic()
    ids = await _publish_many(a, topic, 10)

    # The window holds the last four events: from the oldest one held, the
    # three after it come back; from an overwritten one, a reset.
    held = await subscribe(a, topic, {"Last-Event-ID": ids[6]})
    assert [e.id for e in await held.wait_events(3)] == ids[7:]
    assert _signals(held) == []
    held.close()

    gone = await subscribe(a, topic, {"Last-Event-ID": ids[5]})
    live = await publish(a, topic, {"n": 10})
    await gone.wait_events(1)
    assert [(e.event, e.id) for e in gone.events] == [
        ("ssepg-reset", None),
        ("message", live["id"]),
    ]
    gone.close()


@pytest.mark.gen_test(timeout=60)
async def test_junk_and_oversized_ids_answer_reset_never_an_error(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    await _publish_many(a, topic, 1)
    junk = [
        "x",
        "-",
        "-1",
        "a-b-c",
        "..",
        "%00",
        "id: 1",
        "\u00e9t\u00e9",
        "a" * 10 * 1024,
        "9" * 10 * 1024,
    ]
    clients = []
    for value in junk:
        client = await subscribe(a, topic, {"Last-Event-ID": value})
        assert client.status == 200, value[:20]
        clients.append(client)
    for value in ["%FF%FE", "a" * 10 * 1024, "%0A%0Aid:%20x", "%E2%82%AC"]:
        client = await subscribe(a, topic, query=f"?last_event_id={value}")
        assert client.status == 200, value[:20]
        clients.append(client)
    live = await publish(a, topic, {"n": 1})
    for client in clients:
        await client.wait_events(1)
        assert [(e.event, e.id) for e in client.events] == [
            ("ssepg-reset", None),
            ("message", live["id"]),
        ]
        client.close()
    health = await http("GET", a.url("/healthz"))
    assert health.code == 200


@pytest.mark.gen_test(timeout=60)
async def test_an_empty_id_is_no_id_live_without_reset(services, pg_dsn):
    # A browser never sends an empty Last-Event-ID; a client that does has
    # nothing to resume from, so it is served as a plain subscription, and
    # an empty header leaves the query parameter in charge.
    a = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    old = await _publish_many(a, topic, 3)
    plain = [
        await subscribe(a, topic, {"Last-Event-ID": ""}),
        await subscribe(a, topic, {"Last-Event-ID": " "}),
        await subscribe(a, topic, query="?last_event_id="),
        await subscribe(a, topic, query="?last_event_id=&last_event_id="),
    ]
    resumed = await subscribe(
        a, topic, {"Last-Event-ID": ""}, query=f"?last_event_id={old[1]}"
    )
    live = await publish(a, topic, {"n": 3})
    for client in plain:
        await client.wait_events(1)
        assert [(e.event, e.id) for e in client.events] == [("message", live["id"])]
        client.close()
    await resumed.wait_events(2)
    assert [e.id for e in resumed.events] == [old[2], live["id"]]
    resumed.close()


@pytest.mark.gen_test(timeout=60)
async def test_heartbeats_comments_and_signals_never_carry_an_id(services, pg_dsn):
    a = await services.start(dsn=pg_dsn, keep_alive=0.1)
    topic = unique_topic()
    client = await subscribe(a, topic, {"Last-Event-ID": "unknown-7"})
    await publish(a, topic, {"n": 0})
    await client.wait_events(1)
    await wait_until(
        lambda: client.comments.count("keep-alive") >= 2, message="two heartbeats"
    )
    await publish(a, topic, {"n": 1})
    await client.wait_events(2)
    client.close()

    blocks = [b for b in bytes(client.body).decode().split("\n\n") if b]
    kinds = set()
    for block in blocks:
        lines = block.split("\n")
        has_id = any(line.startswith("id:") for line in lines)
        if lines[0].startswith(":") or lines[0].startswith("retry:"):
            kinds.add("comment" if lines[0].startswith(":") else "retry")
            assert not has_id, block
        elif any(line.startswith("event: ssepg-") for line in lines):
            kinds.add("signal")
            assert not has_id, block
        else:
            kinds.add("event")
            assert has_id and lines[0].startswith("id: "), block
    assert kinds == {"comment", "retry", "signal", "event"}


@pytest.mark.gen_test(timeout=90)
@pytest.mark.allow_warnings
async def test_resume_from_before_a_listener_gap_answers_reset(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    watcher = await subscribe(a, topic)
    before = await _publish_many(a, topic, 2)
    await watcher.wait_events(2)

    old_pid = a.service.broker.listener_pid
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
    await wait_until(
        lambda: (
            a.service.broker.is_connected and a.service.broker.listener_pid != old_pid
        ),
        timeout=30,
        message="listener reconnected",
    )
    await wait_until(
        lambda: ("ssepg-gap", "{}") in _signals(watcher), message="gap frame"
    )
    after = await publish(a, topic, {"n": 2})
    await watcher.wait_events(3)

    # On the instance that lost its listener, no resume from before the gap.
    for anchor in before:
        client = await subscribe(a, topic, {"Last-Event-ID": anchor})
        live = await publish(a, topic, {"n": "live"})
        await client.wait_events(1)
        assert [(e.event, e.id) for e in client.events] == [
            ("ssepg-reset", None),
            ("message", live["id"]),
        ]
        client.close()

    # From after the gap it resumes; the other instance lost nothing.
    expected = [str(e.id) for e in await watcher.wait_events(5)][1:]
    assert expected[:2] == [before[1], after["id"]]
    later = await subscribe(a, topic, {"Last-Event-ID": after["id"]})
    await _heard(b, expected[-1])
    elsewhere = await subscribe(b, topic, {"Last-Event-ID": before[0]})
    assert [e.id for e in await elsewhere.wait_events(4)] == expected
    assert [e.id for e in await later.wait_events(2)] == expected[2:]
    assert _signals(later) == [] and _signals(elsewhere) == []
    for client in (watcher, later, elsewhere):
        client.close()


@pytest.mark.gen_test(timeout=90)
async def test_no_duplicate_or_hole_at_the_seam_while_publishing(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    reference = await subscribe(a, topic)
    total = 400
    done = asyncio.Event()

    async def publisher() -> None:
        for start in range(0, total, 4):
            # Both instances publish; Postgres sets the one order all see.
            await asyncio.gather(
                *(
                    publish(a if n % 2 else b, topic, {"n": n})
                    for n in range(start, start + 4)
                )
            )
        done.set()

    task = asyncio.ensure_future(publisher())
    seen: list[str] = []
    rng = random.Random(7)
    reconnects = 0
    try:
        while len(seen) < total:
            target = (a, b)[reconnects % 2]
            headers: dict[str, str] = {}
            if seen:
                await _heard(target, seen[-1])
                headers["Last-Event-ID"] = seen[-1]
            client = await subscribe(target, topic, headers)
            want = min(total, len(seen) + rng.randint(1, 25))

            def enough(c: SSEClient = client, w: int = want) -> bool:
                return len(seen) + len(c.data_events()) >= w

            await wait_until(enough, message="events on a resumed stream")
            client.close()
            assert _signals(client) == []
            seen.extend(str(e.id) for e in client.data_events())
            reconnects += 1
    finally:
        await task
    await reference.wait_events(total)
    expected = [e.id for e in reference.data_events()]
    assert len(set(seen)) == len(seen), "an event arrived twice"
    assert seen == expected
    assert sorted(e.json["n"] for e in reference.data_events()) == list(range(total))
    assert done.is_set()
    assert reconnects >= 10
    reference.close()


@pytest.mark.gen_test(timeout=60)
async def test_gzip_stream_resumes_like_a_plain_one(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    ids = await _publish_many(a, topic, 3)
    client = await subscribe(
        a, topic, {"Last-Event-ID": ids[0], "Accept-Encoding": "gzip"}
    )
    assert client.response_headers.get("content-encoding") == "gzip"
    live = await publish(a, topic, {"n": 3})
    assert [e.id for e in await client.wait_events(3)] == ids[1:] + [live["id"]]
    client.close()


@pytest.mark.gen_test(timeout=30)
async def test_windows_shrunk_or_topics_removed_answer_reset():
    dispatcher = Dispatcher(ring_capacity=8)
    kept = dispatcher.subscribe("kept")
    anchor = dispatcher.publish("kept", 0)
    shrunk_ids = [dispatcher.publish("shrunk", n) for n in range(4)]
    dropped_id = dispatcher.publish("dropped", 0)
    later_kept = dispatcher.publish("kept", 1)

    # Memory pressure halves windows of topics without subscribers first.
    dispatcher.shrink_windows()
    dispatcher.shrink_windows()
    assert dispatcher.topics["shrunk"].ring.capacity == 2
    assert dispatcher.topics["kept"].ring.capacity == 8
    from_shrunk = dispatcher.subscribe("shrunk", last_event_id=shrunk_ids[1])
    from_other = dispatcher.subscribe("shrunk", last_event_id=anchor)
    from_held = dispatcher.subscribe("shrunk", last_event_id=shrunk_ids[2])

    # An idle topic goes with its window; its old events are not resumable,
    # even from an id of another topic that is still held.
    dispatcher.topics["dropped"].last_activity -= 10
    removed, _ = dispatcher.remove_idle_topics(idle_timeout=5)
    assert removed == 1 and "dropped" not in dispatcher.topics
    after_drop = dispatcher.subscribe("dropped", last_event_id=anchor)
    from_dropped = dispatcher.subscribe("dropped", last_event_id=dropped_id)
    # Everything the topic lost lies before this id: nothing to reset.
    past_drop = dispatcher.subscribe("dropped", last_event_id=later_kept)

    subs = {
        "from_shrunk": from_shrunk,
        "from_other": from_other,
        "from_held": from_held,
        "after_drop": after_drop,
        "from_dropped": from_dropped,
        "past_drop": past_drop,
    }
    got = {}
    for name, sub in subs.items():
        sub.close()
        got[name] = [(e.event, e.id) async for e in sub]
    reset = [("ssepg-reset", None)]
    assert got == {
        "from_shrunk": reset,
        "from_other": reset,
        "from_held": [("message", shrunk_ids[3])],
        "after_drop": reset,
        "from_dropped": reset,
        "past_drop": [],
    }
    dispatcher.flush()
    kept.close()
    assert [e.id async for e in kept] == [anchor, later_kept]
    dispatcher.close()


def _ids_in(raw: bytes) -> list[str]:
    return [line[4:] for line in raw.decode().split("\n") if line.startswith("id: ")]


async def _read_until(sock: socket.socket, predicate: Callable[[bytes], bool]) -> bytes:
    received = bytearray()

    def ready() -> bool:
        try:
            while chunk := sock.recv(65536):
                received.extend(chunk)
        except BlockingIOError:
            pass
        return predicate(bytes(received))

    await wait_until(ready, message="stream bytes")
    return bytes(received)


@pytest.mark.gen_test(timeout=30)
async def test_resume_from_an_event_not_yet_fanned_out_here_sends_no_duplicate():
    # The client saw e1 and e2 on a faster instance and fails over to this
    # one, which heard them too but has not fanned them out to its own
    # subscribers yet (that happens on the next IOLoop turn).
    dispatcher = Dispatcher()
    topic = unique_topic()
    here, watcher = socket.socketpair()
    mine, client = socket.socketpair()
    for s in (here, watcher, mine, client):
        s.setblocking(False)
    dispatcher.add_stream(here, (topic,))
    ids = [dispatcher.publish(topic, n) for n in range(3)]
    dispatcher.add_stream(mine, (topic,), last_event_id=ids[1])
    watched = await _read_until(watcher, lambda raw: len(_ids_in(raw)) == 3)
    later = dispatcher.publish(topic, 3)
    got = await _read_until(client, lambda raw: later in _ids_in(raw))
    assert _ids_in(watched) == ids
    assert _ids_in(got) == [ids[2], later]
    dispatcher.close()
    watcher.close()
    client.close()
