"""Malformed and hostile requests, sent raw over sockets so that no client
library tidies them up, each with its exact expected answer; afterwards the
server still serves a normal publish and subscribe.

Requests broken at the HTTP level (bad ``Content-Length``, a control byte or
raw non-ASCII bytes in the request line, a method HTTP does not define) are
refused by the HTTP parser with a JSON 400, and the connection closes. Header
blocks from 16 to 64 KiB get a JSON 431, request targets past 16 KiB a JSON
414; a header block past 64 KiB is not read at all (the connection closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from ssepg.broker import build_envelope

from support import DEADLINE_S, Running, publish, subscribe, unique_topic

# Some hostile requests provoke warnings (a dropped slow reader, Tornado's
# own notes on malformed requests).
pytestmark = pytest.mark.allow_warnings

PUBLISH_TOKEN = "pub-secret-token"
LISTEN_TOKEN = "sub-secret-token"
BODY_LIMIT = 256 * 1024
NOTIFY_LIMIT = 7900

INVALID_TOPIC = {"error": "invalid topic"}
INVALID_JSON = {"error": "invalid json"}
NOT_OBJECT = {"error": "json value is not an object"}
MISSING_DATA = {"error": "missing data"}
TRAILING = {"error": "trailing data after json value"}
INVALID_UTF8 = {"error": "invalid utf-8"}
TOO_DEEP = {"error": "json nested too deeply"}
NOT_ALLOWED = {"error": "method not allowed"}
NOT_FOUND = {"error": "not found"}
UNAUTHORIZED = {"error": "unauthorized"}
BAD_LIMIT = {"error": "limit must be an integer from 0 to 999999999"}
BAD_REQUEST = {"error": "bad request"}
UNKNOWN_METHOD = {"error": "unknown method"}
NO_UPGRADES = {"error": "protocol upgrades are not supported"}
TOPIC_METHODS = {"Allow": "GET, POST, OPTIONS"}
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ssepg"', "Cache-Control": "no-store"}

# The id line of a real event: <instance id>-<counter>.
REAL_ID_LINE = re.compile(rb"\nid: [a-z2-7]{8}-[0-9]+\n")

# Special expectations besides a JSON error body.
BARE = "bare"  # a status line and no body at all (HTTP-level errors, HEAD)
RESET = "reset"  # an SSE stream that starts with ssepg-reset for the topic
CLOSED = "closed"  # the connection closes without an answer


@dataclass
class Context:
    open: Running
    protected: Running
    topic: str


Request = bytes | Callable[[Context], bytes]


@dataclass
class Case:
    name: str
    request: Request
    status: int | None
    expect: dict[str, Any] | str | Callable[[Context, dict[str, Any]], bool]
    headers: dict[str, str] = field(default_factory=dict)
    protected: bool = False


@dataclass
class Answer:
    status: int | None
    headers: dict[str, str]
    body: bytes


def post(path: str | bytes, body: bytes, *headers: str) -> bytes:
    if isinstance(path, str):
        path = path.encode()
    head = (
        b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    )
    head += b"Content-Length: %d\r\n" % len(body)
    head += b"".join(h.encode("latin-1") + b"\r\n" for h in headers)
    return head + b"\r\n" + body


def get(path: str | bytes, *headers: str | bytes) -> bytes:
    if isinstance(path, str):
        path = path.encode()
    lines = [h if isinstance(h, bytes) else h.encode("latin-1") for h in headers]
    return (
        b"GET "
        + path
        + b" HTTP/1.1\r\nHost: x\r\n"
        + b"".join(h + b"\r\n" for h in lines)
        + b"\r\n"
    )


def method(verb: str, path: str = "/topics/t/events") -> bytes:
    return f"{verb} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()


def publish_to(body: bytes, *headers: str) -> Callable[[Context], bytes]:
    return lambda ctx: post(f"/topics/{ctx.topic}/events", body, *headers)


def nested(depth: int, open_: bytes, close: bytes) -> bytes:
    return b'{"data":' + open_ * depth + b"1" + close * depth + b"}"


def envelope_body(ctx: Context, envelope_bytes: int) -> bytes:
    """A publish body whose envelope is exactly *envelope_bytes* long in
    UTF-8; two-byte characters make it shorter in characters than in
    bytes, so a count of characters would be wrong."""
    service = ctx.open.service
    used = service.dispatcher.next_id()  # the request gets the next one
    prefix, _, counter = used.rpartition("-")
    event_id = f"{prefix}-{int(counter) + 1}"
    empty = len(build_envelope(ctx.topic, event_id, "message", b'""'))
    wide = 1000  # characters of two bytes each
    narrow = envelope_bytes - empty - 2 * wide
    data = '"' + "é" * wide + "a" * narrow + '"'
    body = b'{"data":' + data.encode("utf-8") + b"}"
    envelope = build_envelope(ctx.topic, event_id, "message", data.encode("utf-8"))
    assert len(envelope) == envelope_bytes
    assert len(envelope.decode("utf-8")) == envelope_bytes - wide
    return post(f"/topics/{ctx.topic}/events", body)


def chunked_post(path: str, total: int, piece: int = 65536) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n" % piece + b" " * piece + b"\r\n"
    return head.encode() + chunk * (total // piece) + b"0\r\n\r\n"


def is_published_to(
    topic: Callable[[Context], str],
) -> Callable[[Context, dict[str, Any]], bool]:
    def check(ctx: Context, body: dict[str, Any]) -> bool:
        return body.get("topic") == topic(ctx) and isinstance(body.get("id"), str)

    return check


def too_large_chunked(ctx: Context, body: dict[str, Any]) -> bool:
    return (
        set(body) == {"error", "size", "limit"}
        and body["error"] == "request body too large"
        and body["limit"] == BODY_LIMIT
        and body["size"] > BODY_LIMIT
    )


def batch(body: bytes) -> bytes:
    return post("/topics", body)


TEN_MB = 10 * 1024 * 1024
LONG_ID = "9" * 10_000

CASES: list[Case] = [
    # Topic ids ---------------------------------------------------------------
    Case(
        "empty topic, publish",
        post("/topics//events", b'{"data":1}'),
        400,
        INVALID_TOPIC,
    ),
    Case("empty topic, subscribe", get("/topics//events"), 400, INVALID_TOPIC),
    Case(
        "topic of 129 characters",
        get("/topics/" + "a" * 129 + "/events"),
        400,
        INVALID_TOPIC,
    ),
    Case(
        "topic of 129 characters, publish",
        post("/topics/" + "b" * 129 + "/events", b'{"data":1}'),
        400,
        INVALID_TOPIC,
    ),
    Case("encoded slash %2F", get("/topics/a%2Fb/events"), 400, INVALID_TOPIC),
    Case(
        "encoded slash %2f, publish",
        post("/topics/a%2fb/events", b'{"data":1}'),
        400,
        INVALID_TOPIC,
    ),
    Case("dot-dot segment", get("/topics/../events"), 400, INVALID_TOPIC),
    Case("dot segment", get("/topics/./events"), 400, INVALID_TOPIC),
    Case("encoded dot-dot", get("/topics/%2E%2E/events"), 400, INVALID_TOPIC),
    Case(
        "non-ASCII, percent-encoded",
        get("/topics/caf%C3%A9/events"),
        400,
        INVALID_TOPIC,
    ),
    Case(
        "non-ASCII, raw UTF-8 bytes",
        get(b"/topics/caf\xc3\xa9/events"),
        400,
        BAD_REQUEST,
    ),
    Case(
        "KELVIN SIGN (Unicode folds it to k)",
        get("/topics/%E2%84%AA/events"),
        400,
        INVALID_TOPIC,
    ),
    Case("control character %00", get("/topics/a%00b/events"), 400, INVALID_TOPIC),
    Case("control character %0A", get("/topics/a%0Ab/events"), 400, INVALID_TOPIC),
    Case(
        "control character %09",
        post("/topics/a%09b/events", b'{"data":1}'),
        400,
        INVALID_TOPIC,
    ),
    Case(
        "raw control byte in the request line",
        get(b"/topics/a\x01b/events"),
        400,
        BAD_REQUEST,
    ),
    Case("space", get("/topics/a%20b/events"), 400, INVALID_TOPIC),
    Case("plus sign", get("/topics/a+b/events"), 400, INVALID_TOPIC),
    Case("broken percent escape", get("/topics/%ZZ/events"), 400, INVALID_TOPIC),
    Case(
        "17 topics on one stream",
        get("/topics/" + ",".join("abcdefghijklmnopq") + "/events"),
        400,
        {"error": "too many topics (limit 16)"},
    ),
    Case("empty topic in a list", get("/topics/a,,b/events"), 400, INVALID_TOPIC),
    Case(
        "publish to two topics",
        post("/topics/a,b/events", b'{"data":1}'),
        400,
        {"error": "publish to one topic at a time"},
    ),
    Case(
        "upper case is folded to lower case",
        lambda ctx: post(f"/topics/{ctx.topic.upper()}/events", b'{"data":1}'),
        200,
        is_published_to(lambda ctx: ctx.topic),
    ),
    # Bodies ------------------------------------------------------------------
    Case("not JSON", publish_to(b"hello"), 400, INVALID_JSON),
    Case("empty body", publish_to(b""), 400, INVALID_JSON),
    Case("top-level array", publish_to(b'[{"data":1}]'), 400, NOT_OBJECT),
    Case("top-level string", publish_to(b'"data"'), 400, NOT_OBJECT),
    Case("empty object", publish_to(b"{}"), 400, MISSING_DATA),
    Case(
        "data null",
        publish_to(b'{"data":null}'),
        400,
        {"error": "data must not be null"},
    ),
    Case("only an event name", publish_to(b'{"event":"x"}'), 400, MISSING_DATA),
    Case("trailing garbage", publish_to(b'{"data":1} x'), 400, TRAILING),
    Case("two JSON values", publish_to(b'{"data":1}{"data":2}'), 400, TRAILING),
    Case("invalid UTF-8", publish_to(b'{"data":"\xff\xfe"}'), 400, INVALID_UTF8),
    Case(
        "UTF-8 encoded surrogate",
        publish_to(b'{"data":"\xed\xa0\x80"}'),
        400,
        INVALID_UTF8,
    ),
    Case("overlong UTF-8", publish_to(b'{"data":"\xc0\xaf"}'), 400, INVALID_UTF8),
    Case("byte order mark", publish_to(b'\xef\xbb\xbf{"data":1}'), 400, INVALID_JSON),
    Case("NaN", publish_to(b'{"data":NaN}'), 400, INVALID_JSON),
    Case("unterminated", publish_to(b'{"data":[1,2'), 400, INVALID_JSON),
    Case(
        "raw NUL inside a string", publish_to(b'{"data":"a\x00b"}'), 400, INVALID_JSON
    ),
    Case(
        "arrays nested 100,000 deep",
        publish_to(nested(100_000, b"[", b"]")),
        400,
        TOO_DEEP,
    ),
    Case(
        "objects nested 40,000 deep",
        publish_to(nested(40_000, b'{"a":', b"}")),
        400,
        TOO_DEEP,
    ),
    Case(
        "10 MB body with Content-Length",
        publish_to(b" " * TEN_MB),
        413,
        {"error": "request body too large", "size": TEN_MB, "limit": BODY_LIMIT},
    ),
    Case(
        "10 MB chunked body",
        lambda ctx: chunked_post(f"/topics/{ctx.topic}/events", TEN_MB),
        413,
        too_large_chunked,
    ),
    Case(
        "envelope exactly at the limit, in UTF-8 bytes",
        lambda ctx: envelope_body(ctx, NOTIFY_LIMIT),
        200,
        is_published_to(lambda ctx: ctx.topic),
    ),
    Case(
        "envelope one byte over the limit, in UTF-8 bytes",
        lambda ctx: envelope_body(ctx, NOTIFY_LIMIT + 1),
        413,
        {"error": "event too large", "size": NOTIFY_LIMIT + 1, "limit": NOTIFY_LIMIT},
    ),
    Case(
        "event name with a space",
        publish_to(b'{"data":1,"event":"a b"}'),
        400,
        {"error": "invalid event name"},
    ),
    Case(
        "event name of 65 characters",
        publish_to(b'{"data":1,"event":"%s"}' % (b"e" * 65)),
        400,
        {"error": "invalid event name"},
    ),
    Case(
        "event name not a string",
        publish_to(b'{"data":1,"event":7}'),
        400,
        {"error": "event must be a string"},
    ),
    Case(
        "Content-Length not a number",
        b"POST /topics/t/events HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        400,
        BAD_REQUEST,
    ),
    Case(
        "negative Content-Length",
        b"POST /topics/t/events HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        400,
        BAD_REQUEST,
    ),
    Case(
        "Content-Length and chunked together",
        b"POST /topics/t/events HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n"
        b'Transfer-Encoding: chunked\r\n\r\na\r\n{"data":1}\r\n0\r\n\r\n',
        400,
        BAD_REQUEST,
    ),
    Case(
        "unknown transfer coding",
        b"POST /topics/t/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        400,
        BAD_REQUEST,
    ),
    Case(
        "an unknown transfer coding before chunked",
        b"POST /topics/t/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo, chunked"
        b'\r\n\r\na\r\n{"data":1}\r\n0\r\n\r\n',
        400,
        BAD_REQUEST,
    ),
    Case(
        "gzip before chunked (never decoded)",
        b"POST /topics/t/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked"
        b'\r\n\r\na\r\n{"data":1}\r\n0\r\n\r\n',
        400,
        BAD_REQUEST,
    ),
    Case(
        "two Transfer-Encoding headers",
        b"POST /topics/t/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo\r\n"
        b'Transfer-Encoding: chunked\r\n\r\na\r\n{"data":1}\r\n0\r\n\r\n',
        400,
        BAD_REQUEST,
    ),
    Case(
        "HTTP/1.0 with a chunked body (no transfer codings in HTTP/1.0)",
        b"POST /topics/t/events HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b'Connection: keep-alive\r\n\r\na\r\n{"data":1}\r\n0\r\n\r\n',
        400,
        BAD_REQUEST,
    ),
    Case(
        "HTTP/1.1 without Host",
        b"GET /healthz HTTP/1.1\r\nAccept: */*\r\n\r\n",
        400,
        {"error": "an HTTP/1.1 request needs one host header"},
    ),
    Case(
        "HTTP/1.1 with two Host headers",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        400,
        {"error": "an HTTP/1.1 request needs one host header"},
    ),
    Case(
        "HTTP/1.0 without Host is fine",
        b"GET /healthz HTTP/1.0\r\n\r\n",
        200,
        lambda ctx, body: body.get("status") == "ok",
    ),
    Case(
        "CONNECT to a topic path",
        b"CONNECT /topics/t/events HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        NO_UPGRADES,
    ),
    Case(
        "CONNECT to an address",
        b"CONNECT 127.0.0.1:5432 HTTP/1.1\r\nHost: 127.0.0.1:5432\r\n\r\n",
        400,
        NO_UPGRADES,
    ),
    Case(
        "an upgrade with a chunked body",
        b"POST /topics/t/events HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
        b"Upgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'a\r\n{"data":1}\r\n0\r\n\r\n',
        400,
        NO_UPGRADES,
    ),
    # Methods and paths -------------------------------------------------------
    Case("PUT", method("PUT"), 405, NOT_ALLOWED, TOPIC_METHODS),
    Case("DELETE", method("DELETE"), 405, NOT_ALLOWED, TOPIC_METHODS),
    Case("PATCH", method("PATCH"), 405, NOT_ALLOWED, TOPIC_METHODS),
    Case("TRACE", method("TRACE"), 405, NOT_ALLOWED, TOPIC_METHODS),
    Case("made-up method", method("BREW"), 400, UNKNOWN_METHOD),
    Case("HEAD (no body in a HEAD answer)", method("HEAD"), 405, BARE, TOPIC_METHODS),
    Case(
        "GET on the batch path",
        get("/topics"),
        405,
        NOT_ALLOWED,
        {"Allow": "POST, OPTIONS"},
    ),
    Case(
        "PUT on health",
        method("PUT", "/healthz"),
        405,
        NOT_ALLOWED,
        {"Allow": "GET, OPTIONS"},
    ),
    Case("not HTTP at all", b"HELLO\r\n\r\n", 400, UNKNOWN_METHOD),
    Case(
        "HTTP/2 preface on an HTTP/1.1 port",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        400,
        BAD_REQUEST,
    ),
    Case("unknown path", get("/nope"), 404, NOT_FOUND),
    Case("path below a topic", get("/topics/t/events/more"), 404, NOT_FOUND),
    Case("topic without /events", get("/topics/t"), 404, NOT_FOUND),
    # Authorization -----------------------------------------------------------
    Case(
        "publish without Authorization",
        publish_to(b'{"data":1}'),
        401,
        UNAUTHORIZED,
        CHALLENGE,
        protected=True,
    ),
    Case(
        "publish with a wrong token",
        publish_to(b'{"data":1}', "Authorization: Bearer nope"),
        401,
        UNAUTHORIZED,
        CHALLENGE,
        protected=True,
    ),
    Case(
        "publish with Basic credentials",
        publish_to(b'{"data":1}', "Authorization: Basic dXNlcjpwYXNz"),
        401,
        UNAUTHORIZED,
        CHALLENGE,
        protected=True,
    ),
    Case(
        "Bearer without a token",
        publish_to(b'{"data":1}', "Authorization: Bearer"),
        401,
        UNAUTHORIZED,
        CHALLENGE,
        protected=True,
    ),
    Case(
        "token followed by more words",
        publish_to(b'{"data":1}', f"Authorization: Bearer {PUBLISH_TOKEN} extra"),
        401,
        UNAUTHORIZED,
        CHALLENGE,
        protected=True,
    ),
    Case(
        "token with bytes outside ASCII",
        publish_to(b'{"data":1}', "Authorization: Bearer \xff\xfe\xe9"),
        401,
        UNAUTHORIZED,
        CHALLENGE,
        protected=True,
    ),
    Case(
        "token of 8 KB",
        publish_to(b'{"data":1}', "Authorization: Bearer " + "t" * 8192),
        401,
        UNAUTHORIZED,
        CHALLENGE,
        protected=True,
    ),
    Case(
        "listen token used to publish",
        publish_to(b'{"data":1}', f"Authorization: Bearer {LISTEN_TOKEN}"),
        401,
        UNAUTHORIZED,
        CHALLENGE,
        protected=True,
    ),
    Case(
        "scheme in lower case is accepted",
        publish_to(b'{"data":1}', f"Authorization: bearer {PUBLISH_TOKEN}"),
        200,
        is_published_to(lambda ctx: ctx.topic),
        protected=True,
    ),
    Case(
        "subscribe without a token",
        lambda ctx: get(f"/topics/{ctx.topic}/events"),
        401,
        UNAUTHORIZED,
        CHALLENGE,
        protected=True,
    ),
    Case(
        "subscribe with a wrong access_token",
        lambda ctx: get(f"/topics/{ctx.topic}/events?access_token=nope"),
        401,
        UNAUTHORIZED,
        CHALLENGE,
        protected=True,
    ),
    Case(
        "wrong header wins over a right access_token",
        lambda ctx: get(
            f"/topics/{ctx.topic}/events?access_token={LISTEN_TOKEN}",
            "Authorization: Bearer nope",
        ),
        401,
        UNAUTHORIZED,
        CHALLENGE,
        protected=True,
    ),
    # Last-Event-ID -----------------------------------------------------------
    Case(
        "Last-Event-ID of 10,000 characters",
        lambda ctx: get(f"/topics/{ctx.topic}/events", "Last-Event-ID: " + LONG_ID),
        200,
        RESET,
    ),
    Case(
        "Last-Event-ID of bytes outside ASCII",
        lambda ctx: get(f"/topics/{ctx.topic}/events", b"Last-Event-ID: \xff\xfe\xe9"),
        200,
        RESET,
    ),
    Case(
        "Last-Event-ID with a control byte",
        lambda ctx: get(f"/topics/{ctx.topic}/events", b"Last-Event-ID: a\x01b"),
        400,
        BAD_REQUEST,
    ),
    Case(
        "Last-Event-ID -1",
        lambda ctx: get(f"/topics/{ctx.topic}/events", "Last-Event-ID: -1"),
        200,
        RESET,
    ),
    Case(
        "Last-Event-ID of a huge number",
        lambda ctx: get(
            f"/topics/{ctx.topic}/events", "Last-Event-ID: " + "9" * 40 + "-1"
        ),
        200,
        RESET,
    ),
    Case(
        "last_event_id query of invalid UTF-8",
        lambda ctx: get(f"/topics/{ctx.topic}/events?last_event_id=%FF%00"),
        200,
        RESET,
    ),
    Case(
        "last_event_id query with a line break and a fake frame",
        lambda ctx: get(
            f"/topics/{ctx.topic}/events?last_event_id=x%0D%0Adata:%20evil%0A%0A"
        ),
        200,
        RESET,
    ),
    # Huge headers ------------------------------------------------------------
    Case(
        "one header of 20 KB",
        get("/topics/t/events", "X-Big: " + "a" * 20_000),
        431,
        {"error": "request headers too large", "size": 20_018, "limit": 16_384},
    ),
    Case(
        "header block of 70 KB, past what the HTTP layer reads",
        get("/topics/t/events", *(f"X-Big{i}: " + "a" * 10_000 for i in range(7))),
        None,
        CLOSED,
    ),
    Case(
        "request line of 20 KB",
        get("/topics/" + "a" * 20_000 + "/events"),
        414,
        {"error": "uri too long", "size": 20_015, "limit": 16_384},
    ),
    Case(
        "200 headers within the limit",
        lambda ctx: post(
            f"/topics/{ctx.topic}/events",
            b'{"data":1}',
            *(f"X-H{i}: {'v' * 40}" for i in range(200)),
        ),
        200,
        is_published_to(lambda ctx: ctx.topic),
    ),
    # Health and batch --------------------------------------------------------
    Case("health limit not a number", get("/healthz?limit=abc"), 400, BAD_LIMIT),
    Case("health limit negative", get("/healthz?limit=-1"), 400, BAD_LIMIT),
    Case("health limit absurd", get("/healthz?limit=99999999999"), 400, BAD_LIMIT),
    Case(
        "batch: events not an array",
        batch(b'{"events":"x"}'),
        400,
        {"error": "events must be an array"},
    ),
    Case("batch: top-level array", batch(b"[]"), 400, NOT_OBJECT),
    Case("batch: no events", batch(b"{}"), 400, {"error": "missing events"}),
    Case(
        "batch: 1,001 events",
        batch(b'{"events":[' + b",".join([b'{"topic":"a","data":1}'] * 1001) + b"]}"),
        413,
        {"error": "too many events", "size": 1001, "limit": 1000},
    ),
]


async def exchange(port: int, request: bytes, is_stream_check: bool) -> Answer:
    """Send *request* as is and read the answer: up to its Content-Length,
    the first frames of an event stream, or the close of the connection.

    Bytes are read from the socket directly: a server that answers early and
    closes while a large body is still arriving makes the kernel reset the
    connection, and what arrived before the reset still counts.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))

    async def send() -> None:
        with contextlib.suppress(OSError):
            await loop.sock_sendall(sock, request)

    sender = asyncio.ensure_future(send())
    data = b""
    try:
        deadline = loop.time() + DEADLINE_S
        while not _complete(data, request, is_stream_check):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"no complete answer within {DEADLINE_S:g} s: {data[:200]!r}"
                )
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), remaining)
            except ConnectionError:
                break
            if not chunk:
                break
            data += chunk
        if is_stream_check and _complete(data, request, True):
            # Give a wrongly echoed id a moment to show up.
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                data += await asyncio.wait_for(loop.sock_recv(sock, 65536), 0.2)
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        sock.close()
    if b"\r\n\r\n" not in data:
        return Answer(None, {}, data)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


def _complete(data: bytes, request: bytes, is_stream_check: bool) -> bool:
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    if b"text/event-stream" in head:
        return not is_stream_check or b"ssepg-reset" in body
    if request.startswith(b"HEAD "):
        return True
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def mismatch(case: Case, ctx: Context, answer: Answer) -> str | None:
    """What is wrong with *answer*, or None."""
    if answer.status != case.status:
        return f"status {answer.status}, expected {case.status}: {answer.body[:200]!r}"
    for name, value in case.headers.items():
        if answer.headers.get(name.lower()) != value:
            return f"header {name}: {answer.headers.get(name.lower())!r}, expected {value!r}"
    expect = case.expect
    if expect in (CLOSED, BARE):
        return None if answer.body == b"" else f"unexpected body {answer.body[:200]!r}"
    if expect == RESET:
        reset = b'event: ssepg-reset\ndata: {"topic":"%s"}\n\n' % ctx.topic.encode()
        if reset not in answer.body:
            return f"no ssepg-reset frame in {answer.body[:300]!r}"
        # A live event of the topic may follow with its own id; the id the
        # client sent must never come back.
        if b"evil" in answer.body or REAL_ID_LINE.sub(b"", answer.body).count(b"\nid:"):
            return f"the stream echoes the id: {answer.body[:300]!r}"
        return None
    if not answer.headers.get("content-type", "").startswith("application/json"):
        return f"content type {answer.headers.get('content-type')!r}"
    try:
        body = json.loads(answer.body)
    except ValueError:
        return f"body is not JSON: {answer.body[:200]!r}"
    if callable(expect):
        return None if expect(ctx, body) else f"unexpected body {body!r}"
    return None if body == expect else f"body {body!r}, expected {expect!r}"


@pytest.mark.gen_test(timeout=120)
async def test_hostile_requests_get_exact_answers_and_the_server_keeps_serving(
    services, pg_dsn
):
    assert len(CASES) >= 40
    ctx = Context(
        open=await services.start(dsn=pg_dsn),
        protected=await services.start(
            dsn=pg_dsn, publish_token=PUBLISH_TOKEN, listen_token=LISTEN_TOKEN
        ),
        topic=unique_topic(),
    )
    failures = []
    for case in CASES:
        running = ctx.protected if case.protected else ctx.open
        request = case.request(ctx) if callable(case.request) else case.request
        answer = await exchange(running.port, request, case.expect == RESET)
        problem = mismatch(case, ctx, answer)
        if problem is not None:
            failures.append(f"{case.name}: {problem}")
    assert failures == []

    # Both servers still serve a normal publish and subscribe.
    topic = unique_topic()
    client = await subscribe(ctx.open, topic)
    body = await publish(ctx.open, topic, {"after": "the table"})
    events = await client.wait_events(1)
    assert (events[0].id, events[0].json) == (body["id"], {"after": "the table"})
    client.close()
    # (Both instances share one database: a second topic keeps them apart.)
    topic = unique_topic()
    auth = {"Authorization": f"Bearer {LISTEN_TOKEN}"}
    client = await subscribe(ctx.protected, topic, auth)
    assert client.status == 200
    published = await ctx.protected.service.publish(topic, [1, 2])
    events = await client.wait_events(1)
    assert (events[0].id, events[0].data) == (published, "[1,2]")
    client.close()
    for running in (ctx.open, ctx.protected):
        health = running.service.health()
        assert health["status"] == "ok"
