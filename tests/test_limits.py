"""Limits that protect the process: slow subscribers, subscriber count,
body size and envelope size (design, sections 2 and 9)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import (
    DEADLINE_S,
    http,
    publish,
    subscribe,
    unique_topic,
    wait_until,
)

# Refused requests and dropped subscribers log WARNING lines.
pytestmark = [pytest.mark.allow_warnings, pytest.mark.both_servers]


async def frozen_subscriber(port: int, path: str) -> socket.socket:
    """A client that asks for a stream and then never reads: its receive
    buffer is as small as the kernel allows."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


async def read_to_end(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()

    async def run() -> None:
        while chunk := await loop.sock_recv(sock, 65536):
            data.extend(chunk)

    await asyncio.wait_for(run(), DEADLINE_S)
    return bytes(data)


def metric(body: bytes, name: str) -> float:
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not exposed")


@pytest.mark.gen_test(timeout=120)
async def test_frozen_reader_dropped_while_healthy_subscriber_gets_every_event(
    services, pg_dsn, caplog
):
    caplog.set_level(logging.WARNING, logger="ssepg.hub")
    limit = 64 * 1024
    a = await services.start(dsn=pg_dsn, client_buffer=limit)
    d = a.service.dispatcher
    topic = unique_topic()
    healthy = await subscribe(a, topic)
    frozen = await frozen_subscriber(a.port, f"/topics/{topic}/events")
    await wait_until(lambda: d.stream_count == 2)
    # The kernel buffers a few MiB for a socket before it pushes back; a
    # small send buffer on the server's side of this connection makes the
    # test reach the ssepg bound after a few hundred KiB instead.
    for sub in d.streams():
        if sub.label == topic and sub.sock.getpeername()[1] == frozen.getsockname()[1]:
            sub.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pad = "f" * 3000
    sent = 0
    while d.dropped_clients == 0:
        assert sent < 2000, "the frozen reader was never dropped"
        await asyncio.gather(
            *(a.service.publish(topic, {"n": sent + i, "pad": pad}) for i in range(20))
        )
        sent += 20
        await wait_until(lambda n=sent: d.received == n)
    for i in range(20):
        await a.service.publish(topic, {"n": sent + i, "pad": pad})
    sent += 20

    events = await healthy.wait_events(sent)
    ring_order = [
        json.loads(m.data)["n"]
        for m in d.topics[topic].ring.messages(
            d.topics[topic].ring.tail, d.topics[topic].ring.head
        )
    ]
    got = [e.json["n"] for e in events]
    assert sorted(got) == list(range(sent))
    # Same order as the dispatcher heard them (the window's tail end).
    assert got[-len(ring_order) :] == ring_order
    assert not healthy.closed

    # The frozen one was closed: reading now reaches the end of the stream,
    # and everything it did get is a well-formed prefix of the stream.
    data = await read_to_end(frozen)
    body = data.split(b"\r\n\r\n", 1)[1].decode("utf-8", "replace")
    complete = body.rsplit("\n\n", 1)[0]
    for frame in complete.split("\n\n"):
        assert frame.startswith(("retry: ", ": ", "id: ")), frame[:40]
    frozen.close()

    assert d.dropped_clients == 1
    report = a.service.health()
    assert report["totals"]["dropped_clients"] == 1
    (entry,) = [t for t in report["topics"] if t["topic"] == topic]
    assert entry["dropped_clients"] == 1
    assert entry["subscribers"] == 1
    response = await http("GET", a.url("/metrics"))
    assert metric(response.body, "ssepg_dropped_clients_total") == 1
    drops = [
        r.getMessage() for r in caplog.records if "dropped subscriber" in r.getMessage()
    ]
    assert len(drops) == 1
    assert "slow consumer" in drops[0] and f"limit {limit}" in drops[0]
    healthy.close()


@pytest.mark.gen_test(timeout=60)
async def test_max_subscribers_answered_with_busy_and_retry(services, pg_dsn):
    a = await services.start(dsn=pg_dsn, max_subscribers=2)
    topic = unique_topic()
    first, second = await subscribe(a, topic), await subscribe(a, topic)
    third = await subscribe(a, topic)
    assert third.status == 200
    assert third.response_headers["content-type"].startswith("text/event-stream")
    assert int(third.response_headers["retry-after"]) >= 1
    await third.wait_closed()
    assert third.comments == ["server busy"]
    assert third.retry is not None and 2000 <= third.retry <= 10000
    # Nobody was evicted to make room.
    await publish(a, topic, "kept")
    for client in (first, second):
        assert (await client.wait_events(1))[0].json == "kept"
    first.close()
    await wait_until(lambda: a.service.dispatcher.stream_count == 1)
    fourth = await subscribe(a, topic)
    await fourth.wait_comment(f"listening {topic}")
    assert "retry-after" not in fourth.response_headers
    for client in (second, fourth):
        client.close()


@pytest.mark.gen_test(timeout=60)
async def test_body_over_max_body_bytes_gets_413_with_size_and_limit(services, pg_dsn):
    a = await services.start(dsn=pg_dsn, max_body_bytes=2048)
    topic = unique_topic()
    body = json.dumps({"data": "x" * 3000})
    response = await http("POST", a.url(f"/topics/{topic}/events"), body)
    assert response.code == 413
    error = json.loads(response.body)
    assert error["size"] == len(body) and error["limit"] == 2048
    batch = json.dumps({"events": [{"topic": topic, "data": "y" * 3000}]})
    response = await http("POST", a.url("/topics"), batch)
    assert response.code == 413
    assert json.loads(response.body)["limit"] == 2048
    # Without a Content-Length the limit holds too.
    status, raw = await chunked_post(a.port, f"/topics/{topic}/events", body.encode())
    assert status == 413
    assert json.loads(raw)["limit"] == 2048
    # Just under the limit is fine.
    assert (
        await http("POST", a.url(f"/topics/{topic}/events"), {"data": "z" * 1900})
    ).code == 200


async def chunked_post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head.encode())
        for start in range(0, len(body), 500):
            piece = body[start : start + 500]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        writer.write(b"0\r\n\r\n")
        response_head = await asyncio.wait_for(
            reader.readuntil(b"\r\n\r\n"), DEADLINE_S
        )
        status = int(response_head.split(b" ", 2)[1])
        length = 0
        for line in response_head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await asyncio.wait_for(reader.readexactly(length), DEADLINE_S)
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_default_body_limit_and_envelope_limit(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    response = await http(
        "POST",
        a.url(f"/topics/{topic}/events"),
        json.dumps({"data": "x" * (300 * 1024)}),
    )
    assert response.code == 413
    assert json.loads(response.body)["limit"] == 256 * 1024
    response = await http(
        "POST", a.url(f"/topics/{topic}/events"), {"data": "é" * 4000}
    )
    assert response.code == 413
    error = json.loads(response.body)
    assert error["limit"] == 7900 and error["size"] > 8000


@pytest.mark.gen_test(timeout=60)
async def test_other_methods_get_405_with_allow_and_options_204(services):
    a = await services.start()
    url = a.url(f"/topics/{unique_topic()}/events")
    for method in ("PUT", "DELETE", "PATCH"):
        response = await http(method, url, b"{}" if method != "DELETE" else None)
        assert response.code == 405
        assert response.headers["Allow"] == "GET, POST, OPTIONS"
    response = await http("OPTIONS", url)
    assert response.code == 204
    assert response.headers["Allow"] == "GET, POST, OPTIONS"
