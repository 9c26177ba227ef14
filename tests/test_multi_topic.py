"""Several topics on one stream: ``GET /topics/a,b,c/events``. Each frame
names its topic, one ``Last-Event-ID`` resumes every topic of the stream on
any instance, and ``ssepg-reset`` comes only for the topics it cannot."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import Callable

import pytest

from ssepg import Dispatcher

from support import SSEClient, http, publish, subscribe, unique_topic, wait_until


async def _heard(running, event_id: str) -> None:
    # See test_resume: an instance knows an id only once it heard it back.
    await wait_until(
        lambda: event_id in running.service.dispatcher._index,
        message=f"instance heard {event_id}",
    )


def _pairs(client: SSEClient) -> list[tuple[str, object]]:
    """(topic, data) of each data event of a multi-topic stream."""
    out = []
    for e in client.data_events():
        body = e.json
        assert set(body) == {"topic", "data"}, body
        out.append((body["topic"], body["data"]))
    return out


def _resets(client: SSEClient) -> list[str]:
    return [e.json["topic"] for e in client.events if e.event == "ssepg-reset"]


@pytest.mark.gen_test(timeout=60)
async def test_each_frame_names_its_topic_in_arrival_order(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    topics = [unique_topic() for _ in range(3)]
    client = await subscribe(a, ",".join(topics))
    assert client.status == 200
    plain = await subscribe(a, topics[0])
    sent = []
    for n in range(9):
        topic = topics[(n * 5) % 3]
        body = await publish(
            a, topic, {"n": n, "s": "x y"}, event="tick" if n == 4 else None
        )
        sent.append((topic, body["id"], {"n": n, "s": "x y"}))
    events = await client.wait_events(9)
    assert [(e.json["topic"], e.id, e.json["data"]) for e in events] == sent
    assert [e.event for e in events] == [
        "tick" if n == 4 else "message" for n in range(9)
    ]
    # The data inside is the publish's compact bytes, unchanged.
    assert events[0].data == f'{{"topic":"{topics[0]}","data":{{"n":0,"s":"x y"}}}}'
    assert "listening " + ",".join(topics) in client.comments

    # A single-topic stream of the same topic keeps the plain payload.
    mine = await plain.wait_events(3)
    assert [e.json for e in mine] == [d for t, _, d in sent if t == topics[0]]
    client.close()
    plain.close()


@pytest.mark.gen_test(timeout=60)
async def test_sixteen_topics_per_stream_and_no_more(services):
    a = await services.start()
    topics = [unique_topic() for _ in range(17)]
    sixteen = await subscribe(a, ",".join(topics[:16]))
    assert sixteen.status == 200
    # Duplicates are dropped before counting: sixteen topics named 17 times.
    again = await subscribe(a, ",".join(topics[:16] + [topics[0].upper()]))
    assert again.status == 200
    again.close()
    response = await http("GET", a.url("/topics/" + ",".join(topics) + "/events"))
    assert response.code == 400
    assert json.loads(response.body) == {"error": "too many topics (limit 16)"}
    for path in (f"{topics[0]},", f"{topics[0]},,{topics[1]}", f"{topics[0]},b%20c"):
        response = await http("GET", a.url(f"/topics/{path}/events"))
        assert response.code == 400, path
        assert json.loads(response.body) == {"error": "invalid topic"}
    for n, topic in enumerate(topics[:16]):
        await publish(a, topic, n)
    events = await sixteen.wait_events(16)
    assert [e.json for e in events] == [
        {"topic": t, "data": n} for n, t in enumerate(topics[:16])
    ]
    assert a.service.dispatcher.stream_count == 1
    sixteen.close()


@pytest.mark.gen_test(timeout=60)
async def test_one_id_resumes_every_topic_on_another_instance(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    x, y, quiet = unique_topic("x"), unique_topic("y"), unique_topic("q")
    path = f"{x},{y},{quiet}"
    client = await subscribe(a, path)
    await publish(a, x, 0)
    await publish(b, y, 1)
    seen = await client.wait_events(2)
    last = str(seen[-1].id)
    client.close()

    missed = []
    for n, (via, topic) in enumerate([(a, x), (b, y), (b, x), (a, y), (a, x)], start=2):
        missed.append((topic, n, (await publish(via, topic, n))["id"]))
    await _heard(b, missed[-1][2])
    # b holds windows for x and y without any subscriber; the quiet topic
    # was never heard there, and a resume needs no reset for it either.
    resumed = await subscribe(b, path, {"Last-Event-ID": last})
    events = await resumed.wait_events(5)
    assert [(e.json["topic"], e.json["data"], e.id) for e in events] == missed
    assert _resets(resumed) == []

    live = await publish(a, quiet, 7)
    events = await resumed.wait_events(6)
    assert (events[-1].json, events[-1].id) == ({"topic": quiet, "data": 7}, live["id"])
    resumed.close()


@pytest.mark.gen_test(timeout=60)
async def test_reset_only_for_the_topics_that_cannot_resume(services, pg_dsn):
    a = await services.start(dsn=pg_dsn, ring_capacity=4)
    hot, calm = unique_topic("hot"), unique_topic("calm")
    client = await subscribe(a, f"{hot},{calm}")
    await publish(a, hot, 0)
    await publish(a, calm, 0)
    last = str((await client.wait_events(2))[-1].id)
    client.close()

    # hot overflows its window of four; calm keeps everything after the id.
    for n in range(1, 9):
        await publish(a, hot, n)
    calm_ids = [(await publish(a, calm, n))["id"] for n in (1, 2)]
    await _heard(a, calm_ids[-1])
    resumed = await subscribe(a, f"{hot},{calm}", {"Last-Event-ID": last})
    await resumed.wait_events(2)
    assert [e.event for e in resumed.events] == ["ssepg-reset", "message", "message"]
    assert _resets(resumed) == [hot]
    assert _pairs(resumed) == [(calm, 1), (calm, 2)]
    assert [e.id for e in resumed.data_events()] == calm_ids

    await publish(a, hot, 9)
    await resumed.wait_events(3)
    assert _pairs(resumed)[-1] == (hot, 9)
    resumed.close()


@pytest.mark.gen_test(timeout=60)
async def test_an_instance_that_never_heard_the_id_resets_each_topic(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    x, y = unique_topic("x"), unique_topic("y")
    anchor = (await publish(a, x, 0))["id"]
    await _heard(a, anchor)
    newcomer = await services.start(dsn=pg_dsn)
    client = await subscribe(newcomer, f"{x},{y}", {"Last-Event-ID": anchor})
    live = await publish(a, y, 1)
    await client.wait_events(1)
    assert [(e.event, e.id) for e in client.events] == [
        ("ssepg-reset", None),
        ("ssepg-reset", None),
        ("message", live["id"]),
    ]
    assert sorted(_resets(client)) == sorted([x, y])
    client.close()


@pytest.mark.gen_test(timeout=90)
async def test_no_duplicate_or_hole_across_reconnects_while_publishing(
    services, pg_dsn
):
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    topics = [unique_topic() for _ in range(3)]
    path = ",".join(topics)
    reference = await subscribe(a, path)
    total = 360
    done = asyncio.Event()

    async def publisher() -> None:
        for start in range(0, total, 6):
            await asyncio.gather(
                *(
                    publish(b if n % 3 else a, topics[n % 3], {"n": n})
                    for n in range(start, start + 6)
                )
            )
        done.set()

    task = asyncio.ensure_future(publisher())
    seen: list[tuple[str, str, int]] = []
    rng = random.Random(11)
    reconnects = 0
    try:
        while len(seen) < total:
            target = (b, a)[reconnects % 2]
            headers: dict[str, str] = {}
            if seen:
                await _heard(target, seen[-1][0])
                headers["Last-Event-ID"] = seen[-1][0]
            client = await subscribe(target, path, headers)
            want = min(total, len(seen) + rng.randint(1, 30))

            def enough(c: SSEClient = client, w: int = want) -> bool:
                return len(seen) + len(c.data_events()) >= w

            await wait_until(enough, message="events on a resumed stream")
            client.close()
            assert _resets(client) == []
            seen.extend(
                (str(e.id), e.json["topic"], e.json["data"]["n"])
                for e in client.data_events()
            )
            reconnects += 1
    finally:
        await task
    expected = [
        (e.id, e.json["topic"], e.json["data"]["n"])
        for e in await reference.wait_events(total)
    ]
    assert len({s[0] for s in seen}) == len(seen), "an event arrived twice"
    assert seen == expected
    for topic in topics:
        numbers = [n for _, t, n in expected if t == topic]
        assert sorted(numbers) == [n for n in range(total) if topics[n % 3] == topic]
    assert done.is_set() and reconnects >= 10
    reference.close()


@pytest.mark.gen_test(timeout=60)
async def test_streams_of_overlapping_topic_sets_each_get_their_own(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    x, y, z = unique_topic("x"), unique_topic("y"), unique_topic("z")
    xy = await subscribe(a, f"{x},{y}")
    yz = await subscribe(a, f"{y},{z}", {"Accept-Encoding": "gzip"})
    # Other order and case, same set: shares the first stream's fan-out.
    same = await subscribe(a, f"{y},{x.upper()}")
    for n, topic in enumerate([x, y, z, y, x]):
        await publish(a, topic, n)
    await xy.wait_events(4)
    await yz.wait_events(3)
    await same.wait_events(4)
    assert _pairs(xy) == [(x, 0), (y, 1), (y, 3), (x, 4)]
    assert _pairs(yz) == [(y, 1), (z, 2), (y, 3)]
    assert _pairs(same) == _pairs(xy)
    assert yz.response_headers.get("content-encoding") == "gzip"
    for client in (xy, yz, same):
        client.close()


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
    # The client saw x0, y1, x2 on a faster instance and fails over to this
    # one, which heard them but has not yet run its multi-topic fan-out.
    dispatcher = Dispatcher()
    x, y = unique_topic("x"), unique_topic("y")
    here, watcher = socket.socketpair()
    mine, client = socket.socketpair()
    for s in (here, watcher, mine, client):
        s.setblocking(False)
    dispatcher.add_stream(here, (x, y))
    ids = [dispatcher.publish(topic, n) for n, topic in enumerate([x, y, x, y])]
    dispatcher.add_stream(mine, (x, y), last_event_id=ids[2])
    watched = await _read_until(watcher, lambda raw: len(_ids_in(raw)) == 4)
    later = dispatcher.publish(x, 4)
    got = await _read_until(client, lambda raw: later in _ids_in(raw))
    assert _ids_in(watched) == ids
    assert _ids_in(got) == [ids[3], later]
    dispatcher.close()
    watcher.close()
    client.close()
