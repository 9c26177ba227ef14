"""What ssepg puts on the Postgres wire, seen by a plain psycopg connection,
and what it accepts from it (as from an instance written in another
language)."""

from __future__ import annotations

import asyncio
import json

import psycopg
import pytest

from ssepg._fast import fnv1a_32
from ssepg.broker import channel_for

from support import http, subscribe, unique_topic, wait_until

FNV_VECTORS = {
    "a": 0xE40C292C,
    "foobar": 0xBF9CF968,
    "test-topic": 0xE50931D7,
    "alpha": 0x5D8B6DAB,
    "topic-1": 0xC0C5048E,
}
SHARDS = 8


class Sniffer:
    """A plain psycopg session that LISTENs on every ``topic_broadcast_*``
    channel and keeps what it hears as ``(channel, payload bytes)``."""

    def __init__(self, conn: psycopg.AsyncConnection) -> None:
        self.conn = conn
        self.heard: list[tuple[str, bytes]] = []
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, dsn: str) -> Sniffer:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        for shard in range(SHARDS):
            await conn.execute(f"LISTEN topic_broadcast_{shard}")
        sniffer = cls(conn)
        sniffer._task = asyncio.ensure_future(sniffer._run())
        return sniffer

    async def _run(self) -> None:
        while not self._stopping:
            async for n in self.conn.notifies(timeout=0.2):
                self.heard.append((n.channel, n.payload.encode("utf-8")))

    def with_id(self, event_id: str) -> list[tuple[str, bytes]]:
        needle = b'"id":"' + event_id.encode() + b'"'
        return [(c, p) for c, p in self.heard if needle in p]

    async def wait_for(self, event_id: str) -> tuple[str, bytes]:
        await wait_until(
            lambda: bool(self.with_id(event_id)), message=f"NOTIFY of {event_id}"
        )
        found = self.with_id(event_id)
        assert len(found) == 1, found
        return found[0]

    async def close(self) -> None:
        self._stopping = True
        if self._task is not None:
            await self._task
        await self.conn.close()


def expected_channel(topic: str) -> str:
    return f"topic_broadcast_{FNV_VECTORS[topic] % SHARDS}"


def test_fnv1a_32_vectors():
    for topic, value in FNV_VECTORS.items():
        assert fnv1a_32(topic) == value
        assert fnv1a_32(topic.encode()) == value
        assert channel_for(topic, SHARDS) == expected_channel(topic)
    assert fnv1a_32("") == 0x811C9DC5
    assert fnv1a_32(b"") == 0x811C9DC5
    # A str is hashed as its UTF-8 bytes.
    assert fnv1a_32("é") == fnv1a_32("é".encode())
    assert 0 <= fnv1a_32(b"\xff" * 1000) < 2**32


@pytest.mark.gen_test(timeout=120)
async def test_http_publish_sends_exact_envelope_on_fnv_channel(services, pg_dsn):
    running = await services.start(dsn=pg_dsn)
    sniffer = await Sniffer.start(pg_dsn)
    try:
        data = '{ "k" : [1, 2.50, -0], "s" : "é \\" x" }'
        compact = '{"k":[1,2.50,-0],"s":"é \\" x"}'
        for topic in FNV_VECTORS:
            for event in (None, "custom.Event:1"):
                member = f', "event": "{event}"' if event else ""
                raw = ('{"data": ' + data + member + "}").encode()
                response = await http(
                    "POST", running.url(f"/topics/{topic}/events"), raw
                )
                assert response.code == 200, response.body
                event_id = json.loads(response.body)["id"]
                channel, payload = await sniffer.wait_for(event_id)
                assert channel == expected_channel(topic)
                tail = f',"event":"{event}"}}' if event else "}"
                assert payload == (
                    f'{{"topic":"{topic}","data":{compact},"id":"{event_id}"{tail}'.encode()
                )
    finally:
        await sniffer.close()


@pytest.mark.gen_test(timeout=120)
async def test_programmatic_publish_sends_exact_envelope_on_fnv_channel(
    services, pg_dsn
):
    running = await services.start(dsn=pg_dsn)
    sniffer = await Sniffer.start(pg_dsn)
    try:
        for topic in FNV_VECTORS:
            event_id = await running.service.publish(
                topic, {"n": [1, "two"], "é": None}
            )
            channel, payload = await sniffer.wait_for(event_id)
            assert channel == expected_channel(topic)
            assert (
                payload
                == (
                    f'{{"topic":"{topic}","data":{{"n":[1,"two"],"é":null}},"id":"{event_id}"}}'
                ).encode()
            )
            # The default event name is never written out; any other is.
            event_id = await running.service.publish(topic.upper(), 7, event="message")
            assert (await sniffer.wait_for(event_id))[1] == (
                f'{{"topic":"{topic}","data":7,"id":"{event_id}"}}'.encode()
            )
            event_id = await running.service.publish(topic, "x", event="Tick")
            channel, payload = await sniffer.wait_for(event_id)
            assert channel == expected_channel(topic)
            assert payload == (
                f'{{"topic":"{topic}","data":"x","id":"{event_id}","event":"Tick"}}'.encode()
            )
    finally:
        await sniffer.close()


@pytest.mark.gen_test(timeout=120)
async def test_ids_are_unique_across_instances(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    ids = await asyncio.gather(
        *(s.service.publish(topic, n) for n in range(20) for s in (a, b))
    )
    assert len(set(ids)) == 40
    assert {i.rsplit("-", 1)[0] for i in ids} == {
        a.service.instance_id,
        b.service.instance_id,
    }


async def notify(dsn: str, *payloads: tuple[str, str]) -> None:
    """NOTIFY each ``(channel, payload)`` from a plain session, in order."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for channel, payload in payloads:
            await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


@pytest.mark.gen_test(timeout=120)
async def test_foreign_envelope_reaches_subscribers(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    clients = [await subscribe(a, topic), await subscribe(b, topic)]
    channel = channel_for(topic, SHARDS)
    await notify(
        pg_dsn,
        (channel, f'{{"topic":"{topic}","data":{{"x":1}},"id":"go-1"}}'),
        # Whitespace, other member order, an explicit default event and extra
        # members, as another implementation may write them.
        (
            channel,
            f'{{ "id" : "go-2", "data" : [ 1 , 2.50 ], "topic" : "{topic}", '
            '"event" : "message", "origin" : {"lang": "go"} }',
        ),
        (channel, f'{{"topic":"{topic}","data":"hi","id":"go-3","event":"greeting"}}'),
    )
    for client in clients:
        events = await client.wait_events(3)
        assert [(e.id, e.event, e.data) for e in events] == [
            ("go-1", "message", '{"x":1}'),
            ("go-2", "message", "[1,2.50]"),
            ("go-3", "greeting", '"hi"'),
        ]
        client.close()


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=120)
async def test_bad_envelopes_are_counted_and_skipped(services, pg_dsn):
    running = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    client = await subscribe(running, topic)
    channel = channel_for(topic, SHARDS)
    bad = [
        "not json",
        "",
        "[1,2]",
        '"a string"',
        f'{{"topic":"{topic}","data":1,"id":"x-1"',  # truncated
        f'{{"topic":"{topic}","data":1,"id":"x-1"}} trailing',
        '{"data":1,"id":"x-2"}',  # no topic
        f'{{"topic":"{topic}","id":"x-3"}}',  # no data
        f'{{"topic":"{topic}","data":null,"id":"x-4"}}',
        f'{{"topic":"{topic}","data":1}}',  # no id
        f'{{"topic":"{topic}","data":1,"id":""}}',
        f'{{"topic":"{topic}","data":1,"id":"has space"}}',
        f'{{"topic":"{topic}","data":1,"id":7}}',
        f'{{"topic":"{topic.upper()}","data":1,"id":"x-5"}}',
        '{"topic":"a/b","data":1,"id":"x-6"}',
        f'{{"topic":"{"t" * 129}","data":1,"id":"x-7"}}',
        '{"topic":5,"data":1,"id":"x-8"}',
        f'{{"topic":"{topic}","data":1,"id":"x-9","event":"bad name"}}',
        f'{{"topic":"{topic}","data":1,"id":"x-10","event":3}}',
        f'{{"topic":"{topic}","data":NaN,"id":"x-11"}}',
        f'{{"topic":"{topic}","data":[1,],"id":"x-12"}}',
    ]
    before = running.service.health()["bad_envelopes"]
    good = f'{{"topic":"{topic}","data":{{"ok":true}},"id":"good-1"}}'
    await notify(pg_dsn, *[(channel, p) for p in bad], (channel, good))
    events = await client.wait_events(1)
    assert [(e.id, e.data) for e in events] == [("good-1", '{"ok":true}')]
    assert running.service.health()["bad_envelopes"] - before == len(bad)
    # The listener is still up and delivers what comes next.
    await notify(pg_dsn, (channel, bad[0]), (channel, good.replace("good-1", "good-2")))
    events = await client.wait_events(2)
    assert [e.id for e in events] == ["good-1", "good-2"]
    assert running.service.health()["bad_envelopes"] - before == len(bad) + 1
    assert running.service.health()["listen_connected"] is True
    client.close()
