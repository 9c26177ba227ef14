"""The HTTP/1.1 front of standalone servers: what it does beyond the routes'
contract (tested against both HTTP layers elsewhere): pipelining, handing a
connection over to a stream, 100-continue, HTTP/1.0, requests for a Tornado
application of one's own, and timeouts."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import psutil
import pytest
import tornado.web

from ssepg import front as front_module

from support import DEADLINE_S, http, publish, unique_topic, wait_until


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_answer(
    reader: asyncio.StreamReader,
) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), DEADLINE_S)
    return int(status_line.split()[1]), headers, body


async def read_metrics_answers(reader: asyncio.StreamReader, count: int) -> None:
    """Read *count* answers of pipelined ``GET /metrics``, each whole."""
    for n in range(count):
        status, _, body = await read_answer(reader)
        assert status == 200 and b"ssepg" in body, n


def post(topic: str, body: bytes, *extra: str, version: str = "HTTP/1.1") -> bytes:
    head = [
        f"POST /topics/{topic}/events {version}",
        "Host: x",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.mark.gen_test(timeout=60)
async def test_pipelined_publishes_are_answered_in_order(services, pg_dsn):
    running = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    reader, writer = await connect(running.port)
    writer.write(b"".join(post(topic, b'{"data":%d}' % n) for n in range(20)))
    answers = [await read_answer(reader) for _ in range(20)]
    assert [json.loads(body)["data"] for _, _, body in answers] == list(range(20))
    assert all(status == 200 for status, _, _ in answers)
    writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_garbage_after_a_pending_publish_is_answered_after_it(services, pg_dsn):
    # The publish waits for Postgres while the garbage behind it is parsed:
    # its answer still comes first, then the 400, then the connection closes.
    running = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    reader, writer = await connect(running.port)
    writer.write(post(topic, b'{"data":"first"}') + b"NOT HTTP AT ALL\r\n\r\n")
    status, _, body = await read_answer(reader)
    assert status == 200 and json.loads(body)["data"] == "first"
    status, headers, body = await read_answer(reader)
    assert status == 400 and headers.get("connection") == "close"
    assert json.loads(body) == {"error": "unknown method"}
    assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""
    writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_stream_after_a_pipelined_publish_starts_after_its_answer(services):
    running = await services.start()
    topic = unique_topic()
    reader, writer = await connect(running.port)
    writer.write(
        post(topic, b'{"data":1}')
        + f"GET /topics/{topic}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    status, _, body = await read_answer(reader)
    assert status == 200 and json.loads(body)["topic"] == topic
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"text/event-stream" in head
    await wait_until(lambda: running.service.dispatcher.stream_count == 1)
    await running.service.publish(topic, "live")
    data = b""
    while b'data: "live"' not in data:
        data += await asyncio.wait_for(reader.read(4096), DEADLINE_S)
    writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_expect_100_continue_gets_continue_then_the_answer(services):
    running = await services.start()
    topic = unique_topic()
    reader, writer = await connect(running.port)
    body = b'{"data":"' + b"x" * 5000 + b'"}'
    head = post(topic, b"", "Expect: 100-continue").replace(
        b"Content-Length: 0", b"Content-Length: %d" % len(body)
    )
    writer.write(head)
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    status, _, answer = await read_answer(reader)
    assert status == 200 and len(json.loads(answer)["data"]) == 5000
    writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_http_1_0_closes_unless_keep_alive_is_asked(services):
    running = await services.start()
    topic = unique_topic()
    reader, writer = await connect(running.port)
    writer.write(post(topic, b'{"data":1}', version="HTTP/1.0"))
    status, headers, _ = await read_answer(reader)
    assert status == 200 and headers.get("connection") == "close"
    assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""
    writer.close()
    reader, writer = await connect(running.port)
    writer.write(
        post(topic, b'{"data":2}', "Connection: keep-alive", version="HTTP/1.0")
    )
    status, headers, _ = await read_answer(reader)
    assert status == 200 and headers.get("connection") == "keep-alive"
    writer.write(
        post(topic, b'{"data":3}', "Connection: keep-alive", version="HTTP/1.0")
    )
    status, _, body = await read_answer(reader)
    assert status == 200 and json.loads(body)["data"] == 3
    writer.close()


class Hello(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"hello": self.get_query_argument("name", "world")})

    def post(self) -> None:
        self.set_status(201)
        self.write(self.request.body)


class Streaming(tornado.web.RequestHandler):
    async def get(self) -> None:
        for n in range(3):
            self.write(f"part {n}\n")
            await self.flush()


@pytest.mark.gen_test(timeout=60)
async def test_other_requests_reach_a_tornado_application(services):
    running = await services.start()
    service = running.service
    app = tornado.web.Application([("/hello", Hello), ("/stream", Streaming)])
    front = service.listen(0, "127.0.0.1", app=app)
    base = f"http://127.0.0.1:{front.port}"
    response = await http("GET", base + "/hello?name=ssepg")
    assert response.code == 200 and json.loads(response.body) == {"hello": "ssepg"}
    response = await http("POST", base + "/hello", b"raw body")
    assert response.code == 201 and response.body == b"raw body"
    response = await http("GET", base + "/stream")
    assert response.code == 200 and response.body == b"part 0\npart 1\npart 2\n"
    assert response.headers.get("Transfer-Encoding") == "chunked"
    response = await http("GET", base + "/nothing-here")
    assert response.code == 404
    # ssepg's own routes are still answered by the front.
    topic = unique_topic()
    response = await http("POST", base + f"/topics/{topic}/events", {"data": 1})
    assert response.code == 200 and json.loads(response.body)["topic"] == topic


@pytest.mark.gen_test(timeout=60)
async def test_a_request_left_unfinished_times_out(services, monkeypatch):
    monkeypatch.setattr(front_module, "REQUEST_TIMEOUT_S", 0.2)
    monkeypatch.setattr(front_module, "SWEEP_INTERVAL_S", 0.1)
    running = await services.start()
    reader, writer = await connect(running.port)
    writer.write(
        b"POST /topics/t/events HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{"
    )
    status, headers, body = await read_answer(reader)
    assert status == 408 and json.loads(body) == {"error": "request timeout"}
    assert headers.get("connection") == "close"
    writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_stopped_front_closes_idle_connections_and_refuses_new_ones(services):
    running = await services.start()
    service = running.service
    port = running.port
    reader, writer = await connect(port)
    writer.write(post(unique_topic(), b'{"data":1}'))
    assert (await read_answer(reader))[0] == 200
    fronts = [s for s in service._servers if isinstance(s, front_module.Front)]
    await fronts[0].stop()
    assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""
    with pytest.raises(OSError):
        probe = socket.create_connection(("127.0.0.1", port), timeout=2)
        probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        if not probe.recv(1):
            raise ConnectionResetError("closed without an answer")
    writer.close()


@pytest.mark.gen_test(timeout=120)
async def test_a_long_pipeline_answered_at_once_is_served_in_order(services):
    # Embedded publishes and errors are answered without waiting: a long
    # pipeline of them must be served one after another, not by recursion.
    running = await services.start()
    topic = unique_topic()
    count = 3000
    reader, writer = await connect(running.port)
    requests = []
    for n in range(count):
        if n % 3 == 2:
            requests.append(post(topic, b"not json"))
        else:
            requests.append(post(topic, b'{"data":%d}' % n))
    writer.write(b"".join(requests) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answers = [await read_answer(reader) for _ in range(count + 1)]
    for n, (status, _, body) in enumerate(answers[:count]):
        if n % 3 == 2:
            assert status == 400, n
        else:
            assert status == 200 and json.loads(body)["data"] == n, n
    assert answers[-1][0] == 200 and "status" in json.loads(answers[-1][2])
    writer.close()


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize(
    "start, status",
    [
        (b"GET /healthz?x=", 414),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ", 431),
    ],
    ids=["request line", "header value"],
)
async def test_a_request_head_without_end_is_cut_off(services, start, status):
    # 64 KiB of head is all a request may hold; a head that never ends is
    # answered and dropped once far past it, neither buffered without bound
    # nor parsed again and again.
    running = await services.start()
    rss_before = psutil.Process().memory_info().rss
    reader, writer = await connect(running.port)
    answer = asyncio.ensure_future(reader.read())
    writer.write(start)
    chunk = b"a" * 65536
    sent = 0
    try:
        while not answer.done() and sent < 64 << 20:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
    except ConnectionError:
        pass
    data = await asyncio.wait_for(answer, DEADLINE_S)
    assert data.startswith(b"HTTP/1.1 %d " % status)
    assert b"Connection: close" in data
    writer.close()
    assert psutil.Process().memory_info().rss - rss_before < 32 << 20
    # The server still answers others.
    assert (await http("GET", running.url("/healthz"))).code == 200


@pytest.mark.gen_test(timeout=60)
async def test_upgrade_requests_get_a_plain_answer_then_the_connection_closes(
    services,
):
    running = await services.start()
    topic = unique_topic()
    reader, writer = await connect(running.port)
    writer.write(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    )
    status, headers, _ = await read_answer(reader)
    assert status == 200 and headers.get("connection") == "close"
    assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""
    writer.close()
    # A body sent with an upgrade belongs to the new protocol: refused.
    reader, writer = await connect(running.port)
    writer.write(
        post(topic, b'{"data":"up"}', "Connection: Upgrade", "Upgrade: websocket")
    )
    status, headers, body = await read_answer(reader)
    assert status == 400 and headers.get("connection") == "close"
    assert json.loads(body) == {"error": "protocol upgrades are not supported"}
    writer.close()
    reader, writer = await connect(running.port)
    writer.write(b"CONNECT example.org:80 HTTP/1.1\r\nHost: example.org:80\r\n\r\n")
    status, headers, body = await read_answer(reader)
    assert status == 400 and headers.get("connection") == "close"
    assert json.loads(body) == {"error": "protocol upgrades are not supported"}
    writer.close()


@pytest.mark.gen_test(timeout=120)
async def test_a_stream_never_cuts_off_answers_a_slow_reader_has_not_read(services):
    running = await services.start()
    topic = unique_topic()
    count = 3000
    reader, writer = await connect(running.port)
    writer.transport.pause_reading()
    writer.write(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * count
        + f"GET /topics/{topic}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    # The answers fill the socket buffers; the stream must wait for them.
    front = running.service._servers[0]
    await wait_until(
        lambda: any(
            conn.busy and conn.transport.get_write_buffer_size()
            for conn in front._connections
        ),
        message="answers waiting in the write buffer",
    )
    writer.transport.resume_reading()
    await read_metrics_answers(reader, count)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"text/event-stream" in head
    writer.close()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize(
    "target, status",
    [
        ("/healthz?x=" + "a" * 70_000, 414),
        ("/topics/t/events?x=" + "a" * 70_000, 414),
        ("/unknown?x=" + "a" * 20_000, 414),
    ],
    ids=["over 64 KiB", "topic over 64 KiB", "application route over 16 KiB"],
)
async def test_long_targets_get_414(services, target, status):
    running = await services.start()
    front = running.service.listen(
        0, "127.0.0.1", app=tornado.web.Application([("/hello", Hello)])
    )
    reader, writer = await connect(front.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got, _, body = await read_answer(reader)
    assert got == status
    assert json.loads(body) == {
        "error": "uri too long",
        "size": len(target),
        "limit": 16384,
    }
    writer.close()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize(
    "line", ["GET /healthz HTTP/2.0", "GET /healthz HTTP/0.9", "GET /healthz HTTP/3.1"]
)
async def test_other_http_versions_get_505(services, line):
    running = await services.start()
    reader, writer = await connect(running.port)
    writer.write(f"{line}\r\nHost: x\r\n\r\n".encode())
    status, headers, body = await read_answer(reader)
    assert status == 505 and json.loads(body) == {"error": "http version not supported"}
    assert headers.get("connection") == "close"
    writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_higher_http_1_minor_version_is_served_as_http_1_1(services):
    running = await services.start()
    reader, writer = await connect(running.port)
    for _ in range(2):
        # Kept alive as HTTP/1.1 would be: the second request is answered too.
        writer.write(b"GET /healthz HTTP/1.2\r\nHost: x\r\n\r\n")
        status, headers, body = await read_answer(reader)
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert headers.get("connection") != "close"
    writer.close()


@pytest.mark.gen_test(timeout=120)
async def test_a_closing_answer_still_leaving_is_never_cut_off(services, monkeypatch):
    # After the last answer of a connection the server lingers, then resets;
    # the reset must wait until the answers have left, however long a slow
    # reader takes.
    monkeypatch.setattr(front_module, "LINGER_S", 0.05)
    checks = []
    check = front_module._Connection._linger_check

    def counted(conn, *args):
        checks.append(args)
        check(conn, *args)

    monkeypatch.setattr(front_module._Connection, "_linger_check", counted)
    running = await services.start()
    count = 3000
    reader, writer = await connect(running.port)
    writer.transport.pause_reading()
    writer.write(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * count
        + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    front = running.service._servers[0]
    await wait_until(
        lambda: any(conn.closing for conn in front._connections),
        message="the last answer written",
    )
    # The linger comes and goes many times while nothing is read.
    await wait_until(lambda: len(checks) >= 10, message="lingering checks")
    writer.transport.resume_reading()
    await read_metrics_answers(reader, count)
    status, headers, body = await read_answer(reader)
    assert status == 200 and headers.get("connection") == "close"
    assert json.loads(body)["status"] == "ok"
    assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""
    writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_an_unreadable_request_line_is_logged_with_placeholders(services, caplog):
    caplog.set_level(logging.INFO, logger="ssepg.access")
    running = await services.start()
    reader, writer = await connect(running.port)
    writer.write(b"\x01\x02 junk\r\n\r\n")
    status, _, _ = await read_answer(reader)
    assert status == 400
    writer.close()
    await wait_until(
        lambda: any(r.name == "ssepg.access" for r in caplog.records),
        message="access log line",
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "ssepg.access"]
    assert lines[-1].startswith("- - 400 "), lines


@pytest.mark.gen_test(timeout=60)
async def test_trailing_whitespace_is_not_part_of_a_header_value(services):
    running = await services.start(cors_origins=("https://app.example",))
    topic = unique_topic()
    first = (await publish(running, topic, 1))["id"]
    await publish(running, topic, 2)
    reader, writer = await connect(running.port)
    writer.write(
        f"GET /topics/{topic}/events HTTP/1.1\r\nHost: x\r\n"
        f"Last-Event-ID: {first} \t\r\nOrigin: https://app.example  \r\n\r\n".encode()
    )
    status, headers, _ = await read_answer(reader)
    assert status == 200
    assert headers.get("access-control-allow-origin") == "https://app.example"
    seen = b""
    while b"data: 2" not in seen:
        seen += await asyncio.wait_for(reader.read(65536), DEADLINE_S)
    assert b"ssepg-reset" not in seen and b"data: 1\n" not in seen
    writer.close()
