"""The exact bytes an SSE client receives, read from a raw socket."""

from __future__ import annotations

import asyncio
import json

import pytest

from ssepg._fast import comment, encode_frame

from support import DEADLINE_S, http, publish, unique_topic

# The contract holds whichever HTTP server carries it.
pytestmark = pytest.mark.both_servers

REQUIRED_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache, no-transform",
    "x-accel-buffering": "no",
    "vary": "Accept-Encoding",
}


class RawStream:
    """A bare HTTP/1.1 GET on a socket, read byte for byte."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.status_line = ""
        self.headers: dict[str, str] = {}

    @classmethod
    async def open(cls, port: int, path: str, extra: str = "") -> RawStream:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Accept: text/event-stream\r\n{extra}\r\n".encode("latin-1")
        )
        stream = cls(reader, writer)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
        lines = head.decode("latin-1").split("\r\n")
        stream.status_line = lines[0]
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                stream.headers[name.strip().lower()] = value.strip()
        return stream

    async def read(self, size: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(size), DEADLINE_S)

    async def expect(self, expected: bytes) -> None:
        assert await self.read(len(expected)) == expected

    def close(self) -> None:
        self.writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_stream_head_and_preamble_bytes(services):
    running = await services.start()
    topic = unique_topic()
    stream = await RawStream.open(running.port, f"/topics/{topic}/events")
    assert stream.status_line == "HTTP/1.1 200 OK"
    for name, value in REQUIRED_HEADERS.items():
        assert stream.headers.get(name) == value, name
    assert "content-encoding" not in stream.headers
    assert "content-length" not in stream.headers
    await stream.expect(b"retry: 5000\n\n: listening " + topic.encode() + b"\n\n")
    stream.close()


@pytest.mark.gen_test(timeout=60)
async def test_event_frame_bytes(services):
    running = await services.start()
    topic = unique_topic()
    stream = await RawStream.open(running.port, f"/topics/{topic}/events")
    await stream.expect(b"retry: 5000\n\n: listening " + topic.encode() + b"\n\n")
    response = await http(
        "POST",
        running.url(f"/topics/{topic}/events"),
        '{"data": {"b": [1, 2.50, "x y"], "a": null, "u": "é"}}'.encode(),
    )
    assert response.code == 200
    body = json.loads(response.body)
    expected = (
        b"id: " + body["id"].encode() + b"\nevent: message\n"
        b'data: {"b":[1,2.50,"x y"],"a":null,"u":"\xc3\xa9"}\n\n'
    )
    await stream.expect(expected)
    second = await publish(running, topic, "plain string")
    await stream.expect(
        b"id: " + second["id"].encode() + b'\nevent: message\ndata: "plain string"\n\n'
    )
    stream.close()


@pytest.mark.gen_test(timeout=60)
async def test_custom_event_name_frame_bytes(services):
    running = await services.start()
    topic = unique_topic()
    stream = await RawStream.open(running.port, f"/topics/{topic}/events")
    await stream.expect(b"retry: 5000\n\n: listening " + topic.encode() + b"\n\n")
    body = await publish(running, topic, 42, event="Price.Update:v2")
    await stream.expect(
        b"id: " + body["id"].encode() + b"\nevent: Price.Update:v2\ndata: 42\n\n"
    )
    event_id = await running.service.publish(topic, {"k": 1}, event="tick")
    await stream.expect(
        b"id: " + event_id.encode() + b'\nevent: tick\ndata: {"k":1}\n\n'
    )
    stream.close()


@pytest.mark.gen_test(timeout=60)
async def test_multi_topic_stream_frame_bytes(services):
    running = await services.start()
    a, b = unique_topic("a"), unique_topic("b")
    stream = await RawStream.open(running.port, f"/topics/{a},{b}/events")
    assert stream.status_line == "HTTP/1.1 200 OK"
    await stream.expect(f"retry: 5000\n\n: listening {a},{b}\n\n".encode())
    first = await publish(running, b, {"x": 1})
    await stream.expect(
        b"id: " + first["id"].encode() + b"\nevent: message\n"
        b'data: {"topic":"' + b.encode() + b'","data":{"x":1}}\n\n'
    )
    second = await publish(running, a, [True], event="custom")
    await stream.expect(
        b"id: " + second["id"].encode() + b"\nevent: custom\n"
        b'data: {"topic":"' + a.encode() + b'","data":[true]}\n\n'
    )
    stream.close()


@pytest.mark.gen_test(timeout=60)
async def test_keep_alive_comment_with_short_interval(services):
    running = await services.start(keep_alive=0.2)
    topic = unique_topic()
    stream = await RawStream.open(running.port, f"/topics/{topic}/events")
    await stream.expect(b"retry: 5000\n\n: listening " + topic.encode() + b"\n\n")
    # Several heartbeats in a row, each the exact comment.
    for _ in range(3):
        await stream.expect(b": keep-alive\n\n")
    body = await publish(running, topic, 1)
    frame = b"id: " + body["id"].encode() + b"\nevent: message\ndata: 1\n\n"
    # A heartbeat may fall between the publish and its frame, never inside it.
    received = b""
    while not received.endswith(frame):
        received += await stream.read(1)
    before = received[: -len(frame)]
    assert before == b": keep-alive\n\n" * (len(before) // len(b": keep-alive\n\n"))
    stream.close()


@pytest.mark.gen_test(timeout=60)
async def test_resume_by_last_event_id_header_bytes(services):
    running = await services.start()
    topic = unique_topic()
    ids = [(await publish(running, topic, n))["id"] for n in range(3)]
    stream = await RawStream.open(
        running.port, f"/topics/{topic}/events", f"Last-Event-ID: {ids[0]}\r\n"
    )
    await stream.expect(
        b"retry: 5000\n\n: listening "
        + topic.encode()
        + b"\n\n"
        + b"id: "
        + ids[1].encode()
        + b"\nevent: message\ndata: 1\n\n"
        + b"id: "
        + ids[2].encode()
        + b"\nevent: message\ndata: 2\n\n"
    )
    stream.close()
    unknown = await RawStream.open(
        running.port, f"/topics/{topic}/events?last_event_id=gone-1"
    )
    await unknown.expect(
        b"retry: 5000\n\n: listening "
        + topic.encode()
        + b"\n\n"
        + b'event: ssepg-reset\ndata: {"topic":"'
        + topic.encode()
        + b'"}\n\n'
    )
    unknown.close()


@pytest.mark.gen_test(timeout=60)
async def test_publish_echo_and_stream_copy_are_byte_identical(services):
    running = await services.start()
    topic = unique_topic()
    stream = await RawStream.open(running.port, f"/topics/{topic}/events")
    await stream.expect(b"retry: 5000\n\n: listening " + topic.encode() + b"\n\n")
    raw = b'{ "data" : { "z" : 1.0e+2 , "a" : [ "\\u00e9" , "\\"q\\"" ] } }'
    response = await http("POST", running.url(f"/topics/{topic}/events"), raw)
    assert response.code == 200
    echo = json.loads(response.body)
    data = b'{"z":1.0e+2,"a":["\\u00e9","\\"q\\""]}'
    assert response.body == (
        b'{"topic":"'
        + topic.encode()
        + b'","id":"'
        + echo["id"].encode()
        + b'","data":'
        + data
        + b"}"
    )
    await stream.expect(
        b"id: " + echo["id"].encode() + b"\nevent: message\ndata: " + data + b"\n\n"
    )
    stream.close()


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        (b"one", [b"one"]),
        (b"a\nb", [b"a", b"b"]),
        (b"a\rb", [b"a", b"b"]),
        (b"a\r\nb", [b"a", b"b"]),
        (b"a\rb\nc\r\nd", [b"a", b"b", b"c", b"d"]),
        (b"a\n\nb", [b"a", b"", b"b"]),
        (b"a\r\rb", [b"a", b"", b"b"]),
        (b"a\n\rb", [b"a", b"", b"b"]),
        (b"a\r\n\r\nb", [b"a", b"", b"b"]),
        (b"end\n", [b"end", b""]),
        (b"\nstart", [b"", b"start"]),
        (b"", [b""]),
    ],
)
def test_encode_frame_splits_line_breaks_into_data_lines(data, lines):
    expected = b"id: 7\nevent: message\n" + b"".join(
        b"data: " + x + b"\n" for x in lines
    )
    assert encode_frame("7", "message", data) == expected + b"\n"


def test_encode_frame_without_id():
    assert encode_frame(None, "ssepg-gap", b"{}") == b"event: ssepg-gap\ndata: {}\n\n"


def test_comment_is_one_line():
    assert comment("keep-alive") == b": keep-alive\n\n"
    assert comment("a\nb\rc") == b": a b c\n\n"
