"""gzip streams: decodable event by event as they arrive, properly ended,
with one compressor per topic rather than per subscriber (design, sections
2 and 5)."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import zlib
from typing import Any

import pytest

from ssepg._fast import SYNC_INTERVAL_FRAMES, Subscriber
from ssepg.api import accepts_gzip

from support import DEADLINE_S, SSEClient, unique_topic, wait_until


class GzipStream:
    """A raw-socket subscriber that inflates what arrives, chunk by chunk,
    with the standard decompressor, keeping the compressed body too."""

    def __init__(self, port: int, path: str, accept: str = "gzip") -> None:
        self.port = port
        self.path = path
        self.accept = accept
        self.headers: dict[str, str] = {}
        self.compressed = bytearray()
        self.text = ""
        self.inflate = zlib.decompressobj(wbits=31)
        self.closed = False
        self._task: asyncio.Task[None] | None = None

    async def connect(self) -> GzipStream:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer.write(
            f"GET {self.path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: {self.accept}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
        for line in head.decode("latin-1").split("\r\n")[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                self.headers[name.strip().lower()] = value.strip()
        self._task = asyncio.ensure_future(self._read(reader))
        return self

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(65536):
                self.compressed += chunk
                # Whatever arrived decodes at once: nothing waits for
                # later bytes.
                self.text += self.inflate.decompress(chunk).decode("utf-8")
        finally:
            self.closed = True

    def data_lines(self) -> list[str]:
        return [line[6:] for line in self.text.split("\n") if line.startswith("data: ")]

    async def wait_text(self, fragment: str) -> None:
        await wait_until(
            lambda: fragment in self.text or self.closed,
            message=f"{fragment!r} decoded on {self.path}",
        )
        assert fragment in self.text, f"stream closed before {fragment!r}"

    def close(self) -> None:
        self._writer.close()
        if self._task is not None:
            self._task.cancel()


def event_data(n: int) -> dict[str, Any]:
    return {
        "id": n,
        "type": "order.updated",
        "user": f"user-{n % 17}",
        "item": {"sku": f"SKU-{1000 + n % 50}", "qty": n % 5 + 1, "price": "19.90"},
        "status": ["pending", "paid", "shipped"][n % 3],
        "ts": f"2024-05-01T12:{n % 60:02d}:00Z",
    }


@pytest.mark.gen_test(timeout=90)
async def test_every_event_and_heartbeat_decodes_on_arrival_and_drain_ends_the_member(
    services, pg_dsn
):
    a = await services.start(dsn=pg_dsn, keep_alive=0.3, graceful_drain=0.2)
    topic = unique_topic()
    stream = await GzipStream(a.port, f"/topics/{topic}/events").connect()
    assert stream.headers["content-encoding"] == "gzip"
    assert "Accept-Encoding" in stream.headers["vary"]
    await stream.wait_text(f": listening {topic}\n\n")
    for n in range(5):
        event_id = await a.service.publish(topic, {"n": n})
        # Decoded from the bytes received so far, before anything else is
        # sent: every frame ends at a flush point.
        await stream.wait_text(f'id: {event_id}\nevent: message\ndata: {{"n":{n}}}\n\n')
    beats = stream.text.count(": keep-alive\n\n")
    await wait_until(
        lambda: stream.text.count(": keep-alive\n\n") > beats,
        message="a heartbeat decoded",
    )
    await a.service.publish(topic, {"n": 5})
    await stream.wait_text('data: {"n":5}\n\n')

    await a.service.close()
    await wait_until(lambda: stream.closed, message="stream closed by the drain")
    assert ": server shutting down\n\n" in stream.text
    assert "\nretry: " in stream.text.split(": server shutting down")[1]
    assert stream.inflate.eof
    assert stream.inflate.unused_data == b""
    # The whole body is one valid gzip member (CRC-32 and size checked).
    assert gzip.decompress(bytes(stream.compressed)).decode("utf-8") == stream.text
    assert stream.data_lines() == [f'{{"n":{n}}}' for n in range(6)]


@pytest.mark.gen_test(timeout=120)
async def test_subscribers_joining_at_any_point_decode_everything_after_it(
    services, pg_dsn
):
    a = await services.start(dsn=pg_dsn, graceful_drain=0.2)
    topic, other = unique_topic(), unique_topic()
    k = SYNC_INTERVAL_FRAMES
    join_at = sorted({0, 1, 2, k - 1, k, k + 1, k + 7, 2 * k, 2 * k + 3})
    total = 2 * k + 10
    streams: dict[int, GzipStream] = {}
    plain = await SSEClient(a.port, f"/topics/{topic}/events").connect()
    multi = await GzipStream(a.port, f"/topics/{topic},{other}/events").connect()
    for n in range(total):
        if n in join_at:
            streams[n] = await GzipStream(a.port, f"/topics/{topic}/events").connect()
            await streams[n].wait_text(f": listening {topic}\n\n")
        await a.service.publish(topic, event_data(n))
        # One event at a time, so sync points fall between joins.
        await plain.wait_events(n + 1)
    for stream in streams.values():
        await stream.wait_text(f'"id":{total - 1},')
    await multi.wait_text(f'"id":{total - 1},')
    channel = a.service.dispatcher.topics[topic].channel
    assert channel is not None and channel.has_compressor
    await a.service.close()
    for joined, stream in streams.items():
        await wait_until(lambda s=stream: s.closed)
        lines = stream.data_lines()
        expected = [event_data(n) for n in range(joined, total)]
        assert [json.loads(x) for x in lines] == expected, joined
        assert stream.inflate.eof and stream.inflate.unused_data == b"", joined
        assert gzip.decompress(bytes(stream.compressed)).decode() == stream.text
    await wait_until(lambda: multi.closed)
    assert multi.inflate.eof and multi.inflate.unused_data == b""
    assert len(multi.data_lines()) == total
    plain.close()


@pytest.mark.gen_test(timeout=60)
async def test_no_compressor_per_subscriber(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    streams = [
        await GzipStream(a.port, f"/topics/{topic}/events").connect() for _ in range(20)
    ]
    for n in range(3):
        await a.service.publish(topic, event_data(n))
    for stream in streams:
        await stream.wait_text('"id":2,')
    d = a.service.dispatcher
    channel = d.topics[topic].channel
    assert len(channel) == 20 and channel.has_compressor
    # A subscriber has nowhere to keep a compressor: it holds a socket, its
    # queue and the CRC-32 and length of what it was sent.
    assert not any("compress" in name or "deflat" in name for name in dir(Subscriber))
    for sub in d.streams():
        assert sub.channel is channel and sub.is_gzip
    for stream in streams:
        stream.close()


CUSTOMERS = [
    "Ada Lovelace",
    "Alan Turing",
    "Grace Hopper",
    "Edsger Dijkstra",
    "Barbara Liskov",
    "Donald Knuth",
]


def order_event(rng: random.Random, n: int) -> dict[str, Any]:
    # What an application typically sends: the same keys and vocabulary each
    # time, with ids, amounts and times that differ from event to event.
    return {
        "type": rng.choice(["order.created", "order.updated", "order.paid"]),
        "order_id": 500000 + n,
        "customer": {"id": rng.randrange(100000), "name": rng.choice(CUSTOMERS)},
        "lines": [
            {
                "sku": f"SKU-{rng.randrange(10**4):04d}",
                "qty": rng.randrange(1, 9),
                "unit_price": round(rng.uniform(1, 500), 2),
            }
            for _ in range(rng.randrange(1, 4))
        ],
        "currency": "EUR",
        "status": rng.choice(["pending", "paid", "shipped", "delivered"]),
        "updated_at": f"2024-05-01T12:{n // 60 % 60:02d}:{n % 60:02d}."
        f"{rng.randrange(1000):03d}Z",
    }


@pytest.mark.gen_test(timeout=60)
async def test_typical_json_events_compress_at_least_three_times(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    stream = await GzipStream(a.port, f"/topics/{topic}/events").connect()
    plain = await SSEClient(a.port, f"/topics/{topic}/events").connect()
    rng = random.Random(7)
    count = 300
    for n in range(count):
        # One at a time: every event is its own flushed piece, the least
        # favourable case for compression.
        await a.service.publish(topic, order_event(rng, n))
        await plain.wait_events(n + 1)
    await wait_until(lambda: len(stream.data_lines()) == count, message="all events")
    size = len(stream.text.encode("utf-8"))
    ratio = size / len(stream.compressed)
    assert ratio >= 3.0, f"ratio {ratio:.2f}"
    # Compressed one by one, the same frames would hardly shrink: the gain
    # comes from the shared history.
    frames = [f + "\n\n" for f in stream.text.split("\n\n") if f.startswith("id: ")]
    solo = sum(len(zlib.compress(f.encode("utf-8"))) for f in frames)
    assert size / solo < 2.0
    stream.close()
    plain.close()


@pytest.mark.gen_test(timeout=60)
async def test_gzip_only_when_the_client_accepts_it(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    cases = {
        "gzip": True,
        "GZIP;q=0.5": True,
        "deflate, gzip;q=1.0": True,
        "*": True,
        "gzip;q=0": False,
        "gzip; q=0.000": False,
        "identity": False,
        "br, deflate": False,
        "gzip;q=0, *": False,
        "*;q=0": False,
        "": False,
    }
    for accept, wanted in cases.items():
        assert accepts_gzip(accept or None) is wanted, accept
        headers = {"Accept-Encoding": accept} if accept else {}
        client = await SSEClient(a.port, f"/topics/{topic}/events", headers).connect()
        assert (client.response_headers.get("content-encoding") == "gzip") is wanted, (
            accept
        )
        assert "Accept-Encoding" in client.response_headers["vary"]
        await client.wait_comment(f"listening {topic}")
        client.close()
