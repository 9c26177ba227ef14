"""`ssepg.Dispatcher` on its own: in-process publish and subscribe."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator

import pytest

from ssepg import Dispatcher, Event, InvalidTopic, SlowConsumer, Subscription
from ssepg import hub as hub_module
from ssepg._fast import parse_envelope
from ssepg.broker import build_envelope

from support import DEADLINE_S, unique_topic, wait_until


@pytest.fixture
def dispatcher(io_loop) -> Iterator[Dispatcher]:
    d = Dispatcher(ring_capacity=16, fanout_shards=2)
    try:
        yield d
    finally:
        d.close()


async def take(sub: Subscription, count: int) -> list[Event]:
    """The next *count* events of *sub*, with a generous deadline."""

    async def run() -> list[Event]:
        return [await anext(sub) for _ in range(count)]

    return await asyncio.wait_for(run(), DEADLINE_S)


async def drain(sub: Subscription) -> list[Event]:
    """Every event until the iteration ends."""

    async def run() -> list[Event]:
        return [e async for e in sub]

    return await asyncio.wait_for(run(), DEADLINE_S)


@pytest.mark.gen_test(timeout=30)
async def test_subscribe_returns_async_iterator_of_events(dispatcher):
    topic = unique_topic()
    sub = dispatcher.subscribe(topic)
    assert sub.topic == topic
    assert sub.__aiter__() is sub
    first = dispatcher.publish(topic, {"n": 1, "text": "héllo"})
    second = dispatcher.publish(topic, [1, 2.50, None], event="update")
    events = await take(sub, 2)
    assert [(e.topic, e.id, e.event) for e in events] == [
        (topic, first, "message"),
        (topic, second, "update"),
    ]
    assert events[0].raw == '{"n":1,"text":"héllo"}'
    assert events[0].data == {"n": 1, "text": "héllo"}
    assert events[1].raw == "[1,2.5,null]"
    assert events[1].data == [1, 2.5, None]
    sub.close()


@pytest.mark.gen_test(timeout=30)
async def test_publish_returns_unique_ids_of_this_instance(dispatcher):
    topic = unique_topic()
    ids = [dispatcher.publish(topic, i) for i in range(50)]
    assert len(set(ids)) == 50
    assert all(i.startswith(dispatcher.instance_id + "-") for i in ids)
    other = Dispatcher()
    try:
        assert other.instance_id != dispatcher.instance_id
    finally:
        other.close()


@pytest.mark.gen_test(timeout=30)
async def test_publish_delivers_to_every_subscriber_in_order(dispatcher):
    topic = unique_topic()
    subs = [dispatcher.subscribe(topic) for _ in range(4)]
    ids = [dispatcher.publish(topic, {"n": n}) for n in range(200)]
    for sub in subs:
        events = await take(sub, 200)
        assert [e.id for e in events] == ids
        assert [e.data["n"] for e in events] == list(range(200))
        sub.close()


@pytest.mark.gen_test(timeout=30)
async def test_publish_interleaved_with_reads_keeps_order(dispatcher):
    topic = unique_topic()
    sub = dispatcher.subscribe(topic)
    seen = []
    for n in range(30):
        dispatcher.publish(topic, n)
        if n % 3 == 2:
            seen += [e.data for e in await take(sub, 3)]
    assert seen == list(range(30))
    sub.close()


@pytest.mark.gen_test(timeout=30)
async def test_topics_are_isolated(dispatcher):
    a, b = unique_topic("a"), unique_topic("b")
    sub_a = dispatcher.subscribe(a)
    sub_b = dispatcher.subscribe(b)
    dispatcher.publish(a, "for a")
    dispatcher.publish(b, "for b")
    dispatcher.flush()
    sub_a.close()
    sub_b.close()
    assert [e.data for e in await drain(sub_a)] == ["for a"]
    assert [e.data for e in await drain(sub_b)] == ["for b"]


@pytest.mark.gen_test(timeout=30)
async def test_upper_case_topic_is_folded(dispatcher):
    topic = unique_topic()
    sub = dispatcher.subscribe(topic.upper())
    assert sub.topic == topic
    dispatcher.publish(topic.upper(), 1)
    events = await take(sub, 1)
    assert events[0].topic == topic
    sub.close()


@pytest.mark.gen_test(timeout=30)
async def test_subscription_ends_cleanly_when_closed(dispatcher):
    topic = unique_topic()
    sub = dispatcher.subscribe(topic)
    reader = asyncio.ensure_future(drain(sub))
    dispatcher.publish(topic, 1)
    dispatcher.publish(topic, 2)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not reader.done()
    # Close while the reader waits: it ends after the events already queued.
    dispatcher.publish(topic, 3)
    dispatcher.flush()
    sub.close()
    assert [e.data for e in await reader] == [1, 2, 3]
    assert sub.is_closed
    # Events published afterwards do not reach a closed subscription.
    dispatcher.publish(topic, 4)
    with pytest.raises(StopAsyncIteration):
        await anext(sub)


@pytest.mark.gen_test(timeout=30)
async def test_subscription_close_is_idempotent_and_works_as_context_manager(
    dispatcher,
):
    topic = unique_topic()
    async with dispatcher.subscribe(topic) as sub:
        dispatcher.publish(topic, "x")
        assert (await take(sub, 1))[0].data == "x"
    assert sub.is_closed
    sub.close()
    sub.unsubscribe()
    assert await drain(sub) == []
    assert dispatcher.stats()["totals"]["subscribers"] == 0


@pytest.mark.gen_test(timeout=30)
async def test_subscription_ends_when_dispatcher_closes(io_loop):
    d = Dispatcher()
    topic = unique_topic()
    subs = [d.subscribe(topic) for _ in range(3)]
    readers = [asyncio.ensure_future(drain(s)) for s in subs]
    d.publish(topic, "last")
    d.flush()
    d.close()
    for reader in readers:
        assert [e.data for e in await reader] == ["last"]
    assert d.is_closed
    d.close()  # idempotent
    with pytest.raises(RuntimeError):
        d.publish(topic, 1)
    with pytest.raises(RuntimeError):
        d.subscribe(topic)


@pytest.mark.gen_test(timeout=30)
async def test_resume_replays_after_last_event_id(dispatcher):
    topic = unique_topic()
    ids = [dispatcher.publish(topic, n) for n in range(5)]
    sub = dispatcher.subscribe(topic, last_event_id=ids[1])
    dispatcher.publish(topic, 5)
    events = await take(sub, 4)
    assert [e.data for e in events] == [2, 3, 4, 5]
    assert [e.id for e in events[:3]] == ids[2:]
    sub.close()


@pytest.mark.gen_test(timeout=30)
async def test_resume_from_latest_id_replays_nothing(dispatcher):
    topic = unique_topic()
    ids = [dispatcher.publish(topic, n) for n in range(3)]
    sub = dispatcher.subscribe(topic, last_event_id=ids[-1])
    dispatcher.publish(topic, "live")
    assert [e.data for e in await take(sub, 1)] == ["live"]
    sub.close()


@pytest.mark.gen_test(timeout=30)
async def test_resume_ignores_events_of_other_topics(dispatcher):
    topic, other = unique_topic(), unique_topic()
    anchor = dispatcher.publish(topic, 0)
    dispatcher.publish(other, "other")
    dispatcher.publish(topic, 1)
    sub = dispatcher.subscribe(topic, last_event_id=anchor)
    assert [(e.topic, e.data) for e in await take(sub, 1)] == [(topic, 1)]
    sub.close()


@pytest.mark.gen_test(timeout=30)
async def test_resume_from_unknown_id_signals_reset_first(dispatcher):
    topic = unique_topic()
    dispatcher.publish(topic, "before")
    sub = dispatcher.subscribe(topic, last_event_id="nobody-1")
    dispatcher.publish(topic, "after")
    events = await take(sub, 2)
    assert events[0].event == "ssepg-reset"
    assert events[0].id is None
    assert events[0].data == {"topic": topic}
    assert (events[1].event, events[1].data) == ("message", "after")
    sub.close()


@pytest.mark.gen_test(timeout=30)
async def test_resume_from_id_older_than_window_signals_reset(dispatcher):
    topic = unique_topic()
    ids = [dispatcher.publish(topic, n) for n in range(40)]  # window holds 16
    sub = dispatcher.subscribe(topic, last_event_id=ids[3])
    dispatcher.publish(topic, "live")
    events = await take(sub, 2)
    assert events[0].event == "ssepg-reset"
    assert events[1].data == "live"
    sub.close()
    # The newest ids are still in the window and resume without a reset.
    sub = dispatcher.subscribe(topic, last_event_id=ids[-3])
    assert [e.data for e in await take(sub, 3)] == [38, 39, "live"]
    sub.close()


@pytest.mark.gen_test(timeout=30)
async def test_subscription_that_does_not_read_gets_slow_consumer(io_loop):
    d = Dispatcher(client_buffer=4096)
    topic = unique_topic()
    try:
        stalled = d.subscribe(topic)
        reader = d.subscribe(topic)
        payload = {"pad": "x" * 200}
        for n in range(60):
            d.publish(topic, {**payload, "n": n})
            # The reading subscription keeps up, one event at a time.
            assert (await take(reader, 1))[0].data["n"] == n
        assert stalled.is_closed
        assert not reader.is_closed
        received = []
        with pytest.raises(SlowConsumer):
            async for event in stalled:
                received.append(event.data["n"])
        # What was queued before the drop is still readable, in order, and
        # stays under the buffer plus the event that crossed it.
        assert received == list(range(len(received)))
        assert 4 <= len(received) < 60
        d.publish(topic, {"n": "after"})
        assert (await take(reader, 1))[0].data == {"n": "after"}
    finally:
        d.close()


@pytest.mark.gen_test(timeout=30)
async def test_invalid_arguments_raise(dispatcher):
    topic = unique_topic()
    for bad in ("", "a" * 129, "a/b", "a b", "caf\u00e9", "\u212a", "..", "a\n"):
        with pytest.raises(InvalidTopic):
            dispatcher.publish(bad, 1)
        with pytest.raises(InvalidTopic):
            dispatcher.subscribe(bad)
    with pytest.raises(ValueError, match="None"):
        dispatcher.publish(topic, None)
    for bad_event in ("", "a b", "x" * 65, "caf\u00e9", "a\nb"):
        with pytest.raises(ValueError, match="invalid event name"):
            dispatcher.publish(topic, 1, event=bad_event)
    with pytest.raises(ValueError):
        dispatcher.publish(topic, float("nan"))
    with pytest.raises(TypeError):
        dispatcher.publish(topic, object())
    # Nothing of the refused calls was stored.
    assert topic not in dispatcher.topics or len(dispatcher.topics[topic].ring) == 0


def test_constructor_checks_its_arguments():
    with pytest.raises(ValueError, match="power of two"):
        Dispatcher(ring_capacity=100)
    with pytest.raises(ValueError, match="fanout_shards"):
        Dispatcher(fanout_shards=0)


@pytest.mark.gen_test(timeout=30)
async def test_closing_right_after_a_publish_still_yields_that_event(dispatcher):
    topic = unique_topic()
    sub = dispatcher.subscribe(topic)
    dispatcher.publish(topic, "first")
    dispatcher.publish(topic, "second")
    sub.close()
    assert [e.data for e in await drain(sub)] == ["first", "second"]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("topic", [None, 7, b"bytes"])
async def test_a_topic_that_is_not_a_string_is_an_invalid_topic(dispatcher, topic):
    with pytest.raises(InvalidTopic):
        dispatcher.publish(topic, 1)
    with pytest.raises(InvalidTopic):
        dispatcher.subscribe(topic)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("depth", [512, 2000, 100_000])
async def test_data_nested_deeper_than_receivers_accept_is_refused(dispatcher, depth):
    data: object = 1
    for _ in range(depth):
        data = [data]
    with pytest.raises(ValueError, match="nested too deeply"):
        dispatcher.publish(unique_topic(), data)
    # 511 levels are within the limit: an envelope around them has 512.
    data = 1
    for _ in range(511):
        data = [data]
    topic = unique_topic()
    sub = dispatcher.subscribe(topic)
    dispatcher.publish(topic, data)
    (event,) = await take(sub, 1)
    assert event.raw == "[" * 511 + "1" + "]" * 511
    envelope = build_envelope(topic, event.id, "message", event.raw.encode())
    assert parse_envelope(envelope)[3] == event.raw.encode()
    sub.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_held_fan_out_waits_once_for_every_shard(io_loop):
    # Fan-outs that wait for held events share one wait: when it ends, every
    # shard's fan-out runs, instead of each starting a wait of its own in
    # turn (eight shards would then wait eight times as long).
    from ssepg._fast import fnv1a_32

    shards = 8
    d = Dispatcher(fanout_shards=shards)
    try:
        topics: dict[int, str] = {}
        while len(topics) < shards:
            topic = unique_topic()
            topics.setdefault(fnv1a_32(topic) % shards, topic)
        subs = [d.subscribe(t) for t in topics.values()]
        d.hold()  # a publish request is being read, and stays unfinished
        for topic in topics.values():
            d.publish(topic, {"topic": topic})
        nexts = [asyncio.ensure_future(anext(s)) for s in subs]
        done, _ = await asyncio.wait(
            nexts, timeout=DEADLINE_S, return_when=asyncio.FIRST_COMPLETED
        )
        assert done, "the held fan-out never ran"
        assert all(n.done() for n in nexts)
        assert [n.result().data for n in nexts] == [
            {"topic": t} for t in topics.values()
        ]
        d.release()
    finally:
        d.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_held_publish_whose_event_was_heard_holds_nothing_back(
    io_loop, monkeypatch
):
    # A publish waiting for its broker's confirmation keeps fan-outs waiting
    # only until its own event is heard back; another held publish whose
    # event is still on its way keeps them waiting.
    monkeypatch.setattr(hub_module, "MAX_COALESCE_S", 3600.0)  # no timer ends it
    d = Dispatcher(fanout_shards=2)
    try:
        topic = unique_topic()
        sub = d.subscribe(topic)
        first, second = d.next_id(), d.next_id()
        for event_id in (first, second):
            d.hold()
            d.expect(event_id)
        d.ingest(topic, first, "message", b"1")
        d.fan_out_now()
        assert not sub._queue, "fanned out while an event was still on its way"
        d.ingest(topic, second, "message", b"2")
        d.fan_out_now()
        # Both left at once, before either publish was confirmed.
        assert [m.id for m in sub._queue] == [first, second]
        for event_id in (first, second):
            d.settle(event_id)
            d.release()
        assert (d._holds, d._heard_early, d._expected) == (0, 0, {})
        assert [e.data for e in await take(sub, 2)] == [1, 2]
    finally:
        d.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_publish_confirmed_before_its_event_is_heard_leaves_no_trace(
    dispatcher,
):
    topic = unique_topic()
    sub = dispatcher.subscribe(topic)
    event_id = dispatcher.next_id()
    dispatcher.hold()
    dispatcher.expect(event_id)
    dispatcher.settle(event_id)
    dispatcher.release()
    dispatcher.ingest(topic, event_id, "message", b"3")
    assert (dispatcher._holds, dispatcher._heard_early) == (0, 0)
    assert not dispatcher._expected
    assert [e.data for e in await take(sub, 1)] == [3]
    # Nothing holds a later fan-out back.
    dispatcher.publish(topic, 4)
    dispatcher.fan_out_now()
    assert [m.data for m in sub._queue] == [b"4"]


@pytest.mark.gen_test(timeout=30)
async def test_an_empty_last_event_id_is_no_id(dispatcher):
    topic = unique_topic()
    dispatcher.publish(topic, 0)
    sub = dispatcher.subscribe(topic, last_event_id="")
    live = dispatcher.publish(topic, 1)
    events = await take(sub, 1)
    assert [(e.event, e.id, e.data) for e in events] == [("message", live, 1)]
    sub.close()


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=60)
async def test_a_dropped_stream_logs_every_byte_left_unsent(
    io_loop, monkeypatch, caplog
):
    # One large event that the socket took in part: what is left is the rest
    # of a chunk already begun, and the log must still count it.
    monkeypatch.setattr(hub_module, "WRITE_TIMEOUT_S", 0.3)
    d = Dispatcher(keep_alive=0.2, client_buffer=8 << 20)
    mine, client = socket.socketpair()
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        topic = unique_topic()
        d.add_stream(mine, (topic,))
        d.publish(topic, "x" * (1 << 20))
        d.flush()
        unsent = d.stats()["totals"]["pending_to_clients"]
        assert unsent > 0
        caplog.set_level(logging.WARNING, logger="ssepg.hub")
        await wait_until(lambda: d.stream_count == 0, message="stalled stream dropped")
        logged = [
            r.getMessage() for r in caplog.records if "dropped subscriber" in r.message
        ]
        assert logged and f"write timeout, {unsent} bytes unsent" in logged[0]
    finally:
        d.close()
        client.close()


@pytest.mark.gen_test(timeout=30)
async def test_events_queued_when_the_last_stream_leaves_count_as_broadcast(dispatcher):
    topic = unique_topic()
    mine, client = socket.socketpair()
    try:
        sub = dispatcher.add_stream(mine, (topic,))
        for n in range(5):
            dispatcher.publish(topic, n)  # queued: the fan-out has not run yet
        dispatcher.close_stream(sub)
        dispatcher.publish(topic, 5)  # the topic is passive now
        await wait_until(
            lambda: dispatcher.stats()["totals"]["dispatch_depth"] == 0,
            message="nothing left to fan out",
        )
        (entry,) = dispatcher.stats()["topics"]
        assert (entry["published"], entry["broadcast"]) == (6, 6)
        assert dispatcher.stats()["totals"]["broadcast"] == 6
    finally:
        client.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_copy_of_an_event_still_in_its_window_is_dropped(dispatcher):
    # A publish retried after its connection was lost may have committed the
    # first time as well: the second copy carries the same id.
    topic = unique_topic()
    sub = dispatcher.subscribe(topic)
    event_id = dispatcher.next_id()
    first = dispatcher.ingest(topic, event_id, "message", b'"once"')
    assert dispatcher.ingest(topic, event_id, "message", b'"once"') is first
    dispatcher.publish(topic, "next")
    assert [e.data for e in await take(sub, 2)] == ["once", "next"]
    totals = dispatcher.stats()["totals"]
    assert (totals["duplicates"], totals["received"], totals["broadcast"]) == (1, 2, 2)
