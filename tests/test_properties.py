"""Property-based tests of body parsing and topic validation: any input gives
a correct result or a 4xx with a JSON error, never a 500.

The pure functions run against many generated inputs, checked against
independent references (Python's json module, a regular expression, a
small whitespace stripper). A bounded number of examples then goes through
the HTTP layer of a service running in a thread of its own.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from ssepg import Config, Service
from ssepg.api import ApiError, parse_publish_body, parse_topics
from ssepg.broker import build_envelope
from ssepg.errors import InvalidTopic
from ssepg.service import bound_port
from ssepg.topics import normalize_topic

TOPIC_RE = re.compile(r"[a-z0-9_.:-]{1,128}")
EVENT_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_DEPTH = 512


def reference_topic(name: str) -> str | None:
    """The topic *name* stands for, or None when it is invalid."""
    if not name.isascii():
        return None
    lowered = name.lower()
    if not TOPIC_RE.fullmatch(lowered) or lowered in (".", ".."):
        return None
    return lowered


def minify(text: str) -> str:
    """JSON text without insignificant whitespace (strings untouched)."""
    out = []
    in_string = is_escaped = False
    for ch in text:
        if in_string:
            out.append(ch)
            if is_escaped:
                is_escaped = False
            elif ch == "\\":
                is_escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif ch not in " \t\n\r":
            out.append(ch)
    return "".join(out)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def reference_parse(body: bytes) -> tuple[Any, str] | None:
    """``(data, event)`` as a strict JSON reading of *body* gives it, or None
    when the body must be refused."""
    try:
        text = body.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or value.get("data") is None:
        return None
    if depth(value) > MAX_DEPTH:
        return None
    event = value.get("event")
    if event is None:
        event = "message"
    elif not isinstance(event, str) or not EVENT_RE.fullmatch(event):
        return None
    return value["data"], event


def same_json(a: Any, b: Any) -> bool:
    if (
        isinstance(a, float)
        and isinstance(b, float)
        and math.isnan(a)
        and math.isnan(b)
    ):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(
            same_json(x, y) for x, y in zip(a, b, strict=True)
        )
    return type(a) is type(b) and a == b


# Strategies ------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=20,
)
event_names = st.one_of(
    st.none(),
    st.from_regex(EVENT_RE, fullmatch=True),
    st.text(max_size=70),
    st.integers(),
)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    """Publish bodies that are JSON, mostly well-formed requests, laid out
    in many ways (whitespace, escaping, key order, extra fields)."""
    obj: dict[str, Any] = draw(
        st.dictionaries(st.text(max_size=6), json_values, max_size=3)
    )
    if draw(st.integers(0, 9)):
        obj["data"] = draw(json_values.filter(lambda v: v is not None) | json_values)
    else:
        obj.pop("data", None)
    if draw(st.integers(0, 3)) == 0:
        obj["event"] = draw(event_names)
    else:
        obj.pop("event", None)
    keys = draw(st.permutations(list(obj)))
    obj = {k: obj[k] for k in keys}
    indent = draw(st.sampled_from([None, 0, 1, "\t", " \r\n "]))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
    text = json.dumps(
        obj, indent=indent, separators=separators, ensure_ascii=draw(st.booleans())
    )
    pad = draw(st.sampled_from(["", " ", "\n\t", "\r\n  "]))
    return (pad + text + pad).encode("utf-8")


@st.composite
def mangled_bodies(draw: st.DrawFn) -> bytes:
    """A JSON body with a few bytes changed, cut short or extended."""
    body = bytearray(draw(json_bodies()))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "append"]))
        pos = draw(st.integers(0, len(body)))
        if kind == "flip" and body:
            body[min(pos, len(body) - 1)] = draw(st.integers(0, 255))
        elif kind == "cut":
            del body[pos:]
        elif kind == "insert":
            body[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        else:
            body += draw(
                st.sampled_from([b"x", b"}", b"]", b"{", b'"', b"\xff", b" 1", b"\x00"])
            )
    return bytes(body)


# Well-formed requests half of the time, broken ones the other half.
any_bodies = st.one_of(
    json_bodies(), json_bodies(), mangled_bodies(), st.binary(max_size=64)
)
topic_names = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.:-]{1,130}", fullmatch=True),
    st.text(max_size=40),
    st.sampled_from([".", "..", "...", "a" * 128, "A" * 129, "\u212a", "i\u0307", "ß"]),
)

valid_topics = st.from_regex(r"[A-Za-z0-9_:-][A-Za-z0-9_.:-]{0,40}", fullmatch=True)


# Pure functions ----------------------------------------------------------------


@settings(
    max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(any_bodies)
@example(b'{"data":1}')
@example(b'{"data":1,"data":null}')
@example(b'{"data":"\\ud800"}')
@example(b'{"data":1e999}')
@example(b'{"data":' + b"[" * 600 + b"]" * 600 + b"}")
def test_publish_body_parses_like_strict_json_or_is_a_400(body):
    expected = reference_parse(body)
    event("valid" if expected is not None else "refused")
    try:
        data, name = parse_publish_body(body)
    except ApiError as exc:
        assert exc.status_code == 400
        assert isinstance(exc.body["error"], str) and exc.body["error"]
        assert exc.body["error"] == exc.body["error"].lower()
        assert expected is None, f"refused a valid body: {exc.body}"
        return
    assert expected is not None, f"accepted an invalid body as {data!r}"
    expected_data, expected_event = expected
    assert name == expected_event
    text = data.decode("utf-8")
    assert same_json(json.loads(text), expected_data)
    # Compaction removes insignificant whitespace and nothing else.
    assert text == minify(text)
    source = json.loads(body.decode("utf-8"))["data"]
    assert same_json(json.loads(minify(json.dumps(source))), json.loads(text))


@settings(max_examples=1500, deadline=None)
@given(topic_names)
@example("")
@example("Upper-Case")
def test_topic_is_ascii_lowercased_and_checked(name):
    expected = reference_topic(name)
    event("valid" if expected is not None else "refused")
    try:
        topic = normalize_topic(name)
    except InvalidTopic:
        assert expected is None
        return
    assert topic == expected


@settings(max_examples=400, deadline=None)
@given(st.lists(topic_names, min_size=1, max_size=20))
def test_topic_list_is_checked_whole(names):
    path = ",".join(names)
    parts = path.split(",")
    refs = [reference_topic(p) for p in parts]
    try:
        topics = parse_topics(path)
    except ApiError as exc:
        assert exc.status_code == 400
        assert len(parts) > 16 or None in refs
        return
    assert len(parts) <= 16 and None not in refs
    assert list(topics) == list(dict.fromkeys(refs))


# The HTTP layer ------------------------------------------------------------------


class ThreadedService:
    """A service on an IOLoop of its own thread, so that synchronous
    hypothesis tests can send it requests over blocking sockets."""

    def __init__(self, dsn: str) -> None:
        self.port = 0
        self.service: Service | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(dsn,), daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self.service is None:
            raise RuntimeError("service did not start")

    def _run(self, dsn: str) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start(dsn))
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    async def _start(self, dsn: str) -> None:
        try:
            service = await Service.start(Config(dsn=dsn, graceful_drain=0.0))
            await service.broker.wait_connected(20)  # type: ignore[attr-defined]
            self.port = bound_port(service.listen(0, "127.0.0.1"))
            self.service = service
        except Exception:
            self._ready.set()
            raise

    def close(self) -> None:
        if self.service is not None:
            future = asyncio.run_coroutine_threadsafe(
                self.service.close(drain=0), self._loop
            )
            future.result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


@pytest.fixture(scope="module")
def threaded(pg_dsn: str) -> Iterator[ThreadedService]:
    running = ThreadedService(pg_dsn)
    try:
        yield running
    finally:
        running.close()


def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(request)
        data = b""
        while True:
            head, found, body = data.partition(b"\r\n\r\n")
            if found:
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if length is not None and len(body) >= int(length.group(1)):
                    break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


@pytest.mark.allow_warnings
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(topic=valid_topics | valid_topics | topic_names, body=any_bodies)
@example(topic="Mixed-Case", body=b'{"data": {"a": [1, 2.50, "x"]}, "event": "Up"}')
def test_any_publish_gets_a_json_4xx_or_a_correct_200(threaded, topic, body):
    assume("," not in topic)
    path = "/topics/" + urllib.parse.quote(topic.encode("utf-8"), safe="") + "/events"
    request = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    status, headers, answer = exchange(threaded.port, request)
    event(f"status {status}")
    assert headers.get("content-type", "").startswith("application/json")
    result = json.loads(answer)
    expected_topic = reference_topic(topic)
    expected = reference_parse(body)
    if status != 200:
        assert status in (400, 413), (status, result)
        assert set(result) >= {"error"} and result["error"] == result["error"].lower()
        if expected_topic is not None and expected is not None:
            # Only a too large envelope may refuse a valid request.
            assert status == 413 and result["error"] == "event too large"
            assert result["limit"] == 7900 and result["size"] > 7900
        return
    assert expected_topic is not None and expected is not None
    assert result["topic"] == expected_topic
    data, _ = parse_publish_body(body)
    assert answer.endswith(b',"data":' + data + b"}")
    envelope = build_envelope(expected_topic, result["id"], expected[1], data)
    assert len(envelope) <= 7900
