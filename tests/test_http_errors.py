"""Status codes and JSON error bodies of the HTTP API (design, section 2)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from ssepg.broker import build_envelope

from support import DEADLINE_S, Running, http, publish, subscribe, unique_topic

# Every rejected request writes a WARNING access line.
pytestmark = [pytest.mark.allow_warnings, pytest.mark.both_servers]

BODY_LIMIT = 256 * 1024


def error_of(response: Any) -> dict[str, Any]:
    assert response.headers["Content-Type"].startswith("application/json")
    body = json.loads(response.body)
    assert isinstance(body["error"], str) and body["error"]
    assert body["error"] == body["error"].lower()
    return body


async def raw_request(port: int, request: bytes) -> tuple[int, bytes]:
    """Send *request* as is (no client-side path normalisation); return the
    status code and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await asyncio.wait_for(reader.readexactly(length), DEADLINE_S)
        return status, body
    finally:
        writer.close()


async def post(running: Running, topic: str, body: bytes | str | dict[str, Any]) -> Any:
    return await http("POST", running.url(f"/topics/{topic}/events"), body)


# Topic ids -----------------------------------------------------------------

INVALID_TOPIC_PATHS = [
    "",
    "a" * 129,
    "a%2Fb",
    "%2F",
    "..",
    ".",
    "caf%C3%A9",
    "%E2%84%AA",  # KELVIN SIGN: Unicode lower-casing would give "k"
    "a%00b",
    "a%0Ab",
    "a%09",
    "a%7F",
    "a%20b",
    "a+b",
]


@pytest.mark.parametrize("segment", INVALID_TOPIC_PATHS)
@pytest.mark.gen_test(timeout=60)
async def test_invalid_topic_is_400(services, segment):
    running = await services.start()
    path = f"/topics/{segment}/events"
    for method in ("GET", "POST"):
        body = b'{"data":1}' if method == "POST" else None
        request = f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode()
        if body is not None:
            request += (
                b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
            )
        status, answer = await raw_request(
            running.port, request + b"\r\n" + (body or b"")
        )
        assert status == 400, (method, segment, answer)
        assert json.loads(answer) == {"error": "invalid topic"}


@pytest.mark.gen_test(timeout=60)
async def test_topic_of_128_characters_is_accepted(services):
    running = await services.start()
    topic = "a" * 127 + "b"
    response = await post(running, topic, {"data": 1})
    assert response.code == 200
    assert json.loads(response.body)["topic"] == topic


@pytest.mark.gen_test(timeout=60)
async def test_upper_case_topic_is_folded_to_lower_case(services):
    running = await services.start()
    topic = unique_topic()
    client = await subscribe(running, topic.upper())
    response = await post(running, topic.upper(), {"data": "x"})
    assert response.code == 200
    assert json.loads(response.body)["topic"] == topic
    events = await client.wait_events(1)
    assert events[0].data == '"x"'
    assert client.comments[0] == f"listening {topic}"
    client.close()


# Publish bodies --------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"hello", "invalid json"),
        (b"", "invalid json"),
        (b"{", "invalid json"),
        (b"[1, 2]", "json value is not an object"),
        (b'"data"', "json value is not an object"),
        (b"17", "json value is not an object"),
        (b"null", "json value is not an object"),
        (b"{}", "missing data"),
        (b'{"date": 1}', "missing data"),
        (b'{"data": null}', "data must not be null"),
        (b'{"data": null, "event": "x"}', "data must not be null"),
        (b'{"data": 1} x', "trailing data after json value"),
        (b'{"data": 1}{"data": 2}', "trailing data after json value"),
        (b'{"data": 1},', "trailing data after json value"),
        (b'{"data": "\xff"}', "invalid utf-8"),
        (b'{"data": "\xc0\xaf"}', "invalid utf-8"),
        (b'{"data": "\xed\xa0\x80"}', "invalid utf-8"),
        (b'{"data": NaN}', "invalid json"),
        (b'{"data": 01}', "invalid json"),
        (b'{"data": [1,]}', "invalid json"),
        (b'{"data": ' + b"[" * 600 + b"]" * 600 + b"}", "json nested too deeply"),
        (b'{"data": 1, "event": "bad name"}', "invalid event name"),
        (b'{"data": 1, "event": ""}', "invalid event name"),
        (b'{"data": 1, "event": "' + b"e" * 65 + b'"}', "invalid event name"),
        (b'{"data": 1, "event": "caf\xc3\xa9"}', "invalid event name"),
        (b'{"data": 1, "event": "a\\nb"}', "invalid event name"),
        (b'{"data": 1, "event": 5}', "event must be a string"),
    ],
)
@pytest.mark.gen_test(timeout=60)
async def test_bad_publish_body_is_400(services, body, error):
    running = await services.start()
    topic = unique_topic()
    response = await post(running, topic, body)
    assert response.code == 400, response.body
    assert error_of(response) == {"error": error}


@pytest.mark.gen_test(timeout=60)
async def test_unknown_fields_are_ignored_and_event_name_used(services):
    running = await services.start()
    topic = unique_topic()
    client = await subscribe(running, topic)
    response = await post(
        running, topic, b'{"extra": [1], "data": {"a": 1}, "event": "Up.d:a-t_e"}'
    )
    assert response.code == 200
    assert json.loads(response.body)["data"] == {"a": 1}
    events = await client.wait_events(1)
    assert (events[0].event, events[0].data) == ("Up.d:a-t_e", '{"a":1}')
    client.close()


@pytest.mark.gen_test(timeout=60)
async def test_body_over_limit_is_413_with_size_and_limit(services):
    running = await services.start()
    topic = unique_topic()
    # Exactly at the limit: accepted (whitespace is insignificant).
    exact = b'{"data": 1}' + b" " * (BODY_LIMIT - 11)
    assert len(exact) == BODY_LIMIT
    response = await post(running, topic, exact)
    assert response.code == 200, response.body
    over = exact + b" "
    response = await post(running, topic, over)
    assert response.code == 413
    assert error_of(response) == {
        "error": "request body too large",
        "size": BODY_LIMIT + 1,
        "limit": BODY_LIMIT,
    }


@pytest.mark.gen_test(timeout=60)
async def test_chunked_body_over_limit_is_413(services):
    running = await services.start(max_body_bytes=4096)
    topic = unique_topic()
    chunk = b" " * 3000
    request = (
        f"POST /topics/{topic}/events HTTP/1.1\r\nHost: x\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    request += b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2
    request += b'b\r\n{"data": 1}\r\n0\r\n\r\n'
    status, body = await raw_request(running.port, request)
    assert status == 413
    answer = json.loads(body)
    assert answer["error"] == "request body too large"
    assert answer["limit"] == 4096
    assert answer["size"] > 4096


def envelope_size(
    running: Running, topic: str, data: bytes, counter: int, event: str = "message"
) -> int:
    event_id = f"{running.service.instance_id}-{counter}"
    return len(build_envelope(topic, event_id, event, data))


@pytest.mark.gen_test(timeout=60)
async def test_envelope_over_max_notify_bytes_is_413_with_real_size(services):
    limit = 300
    running = await services.start(max_notify_bytes=limit)
    topic = unique_topic()
    # Ids are <instance>-<counter>; this test stays below ten publishes so
    # every id has the same length.
    text = "é€😀" * 40  # 2 + 3 + 4 UTF-8 bytes per repetition
    data = json.dumps(text, ensure_ascii=False).encode()
    response = await post(running, topic, b'{"data": ' + data + b"}")
    assert response.code == 413
    body = error_of(response)
    expected = envelope_size(running, topic, data, 1)
    assert expected == len(
        f'{{"topic":"{topic}","data":"{text}","id":"{running.service.instance_id}-1"}}'.encode()
    )
    assert body == {"error": "event too large", "size": expected, "limit": limit}
    assert body["size"] > len(text) + 50  # counted in bytes, not characters

    # An envelope of exactly the limit passes; one byte more does not.
    base = envelope_size(running, topic, b'""', 2)
    fill = "x" * (limit - base)
    response = await post(running, topic, {"data": fill})
    assert response.code == 200, response.body
    assert envelope_size(running, topic, json.dumps(fill).encode(), 2) == limit
    response = await post(running, topic, {"data": fill + "x"})
    assert response.code == 413
    assert error_of(response) == {
        "error": "event too large",
        "size": limit + 1,
        "limit": limit,
    }

    # A custom event name counts too.
    base = envelope_size(running, topic, b'""', 4, "custom")
    fill = "y" * (limit - base)
    response = await post(running, topic, {"data": fill, "event": "custom"})
    assert response.code == 200, response.body
    response = await post(running, topic, {"data": fill + "y", "event": "custom"})
    assert response.code == 413
    assert error_of(response)["size"] == limit + 1


@pytest.mark.gen_test(timeout=60)
async def test_envelope_at_default_limit_passes_through_postgres(services, pg_dsn):
    running = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    client = await subscribe(running, topic)
    first = await publish(running, topic, 0)
    counter = int(first["id"].rsplit("-", 1)[1]) + 1
    assert counter < 10  # the next id has the same length
    limit = running.service.config.max_notify_bytes
    fill = "z" * (limit - envelope_size(running, topic, b'""', counter))
    response = await post(running, topic, {"data": fill})
    assert response.code == 200, response.body
    events = await client.wait_events(2)
    assert events[1].data == json.dumps(fill)
    response = await post(running, topic, {"data": fill + "z"})
    assert response.code == 413
    assert error_of(response) == {
        "error": "event too large",
        "size": limit + 1,
        "limit": limit,
    }
    client.close()


# Methods and paths -------------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "HEAD"])
@pytest.mark.gen_test(timeout=60)
async def test_other_methods_are_405_with_allow(services, method):
    running = await services.start()
    topic = unique_topic()
    body = b'{"data": 1}' if method in ("PUT", "PATCH") else None
    response = await http(method, running.url(f"/topics/{topic}/events"), body)
    assert response.code == 405
    assert response.headers["Allow"] == "GET, POST, OPTIONS"
    if method != "HEAD":
        assert error_of(response) == {"error": "method not allowed"}
    response = await http(method, running.url("/topics"), body)
    assert response.code == 405
    assert response.headers["Allow"] == "POST, OPTIONS"


@pytest.mark.gen_test(timeout=60)
async def test_get_on_batch_path_is_405(services):
    running = await services.start()
    response = await http("GET", running.url("/topics"))
    assert response.code == 405
    assert response.headers["Allow"] == "POST, OPTIONS"
    assert error_of(response) == {"error": "method not allowed"}


@pytest.mark.gen_test(timeout=60)
async def test_options_is_204_with_allow(services):
    running = await services.start()
    response = await http("OPTIONS", running.url(f"/topics/{unique_topic()}/events"))
    assert response.code == 204
    assert response.headers["Allow"] == "GET, POST, OPTIONS"
    assert response.body == b""
    response = await http("OPTIONS", running.url("/topics"))
    assert response.code == 204
    assert response.headers["Allow"] == "POST, OPTIONS"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/nope",
        "/topics/x",
        "/topics/x/",
        "/topics/x/events/more",
        "/topics/x/event",
        "/healthz/x",
        "/topicsx/a/events",
    ],
)
@pytest.mark.gen_test(timeout=60)
async def test_unknown_path_is_404_json(services, path):
    running = await services.start()
    for method in ("GET", "POST"):
        response = await http(
            method, running.url(path), b"{}" if method == "POST" else None
        )
        assert response.code == 404, (method, path)
        assert error_of(response) == {"error": "not found"}


# Batch publish -----------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_batch_publish_delivers_in_order(services):
    running = await services.start()
    a, b = unique_topic("a"), unique_topic("b")
    sub_a = await subscribe(running, a)
    sub_b = await subscribe(running, b)
    events = [
        {"topic": a, "data": {"n": 1}},
        {"topic": b.upper(), "data": [2], "event": "second"},
        {"topic": a, "data": "three", "ignored": True},
    ]
    response = await http("POST", running.url("/topics"), {"events": events})
    assert response.code == 200, response.body
    results = json.loads(response.body)["results"]
    assert [r["topic"] for r in results] == [a, b, a]
    assert all(set(r) == {"topic", "id"} for r in results)
    assert len({r["id"] for r in results}) == 3
    got_a = await sub_a.wait_events(2)
    got_b = await sub_b.wait_events(1)
    assert [(e.id, e.data) for e in got_a] == [
        (results[0]["id"], '{"n":1}'),
        (results[2]["id"], '"three"'),
    ]
    assert [(e.id, e.event, e.data) for e in got_b] == [
        (results[1]["id"], "second", "[2]")
    ]
    sub_a.close()
    sub_b.close()


@pytest.mark.gen_test(timeout=60)
async def test_batch_publish_reports_errors_per_item(services):
    running = await services.start(max_notify_bytes=256)
    topic = unique_topic()
    client = await subscribe(running, topic)
    body = (
        b'{"events": ['
        b'{"topic": "' + topic.encode() + b'", "data": 1},'
        b'{"topic": "bad topic", "data": 2},'
        b'{"data": 3},'
        b'{"topic": "' + topic.encode() + b'"},'
        b'{"topic": "' + topic.encode() + b'", "data": null},'
        b'{"topic": "' + topic.encode() + b'", "data": 6, "event": "no spaces"},'
        b'{"topic": "' + topic.encode() + b'", "data": "' + b"x" * 300 + b'"},'
        b"7,"
        b'{"topic": "' + topic.encode() + b'", "data": 8},'
        b'{"topic": 5, "data": 9},'
        b'{"topic": null, "data": 10}'
        b"]}"
    )
    response = await http("POST", running.url("/topics"), body)
    assert response.code == 200, response.body
    results = json.loads(response.body)["results"]
    assert len(results) == 11
    assert set(results[0]) == {"topic", "id"}
    assert results[1] == {"error": "invalid topic", "status": 400}
    assert results[2] == {"error": "missing topic", "status": 400}
    assert results[3] == {"error": "missing data", "status": 400}
    assert results[4] == {"error": "data must not be null", "status": 400}
    assert results[5] == {"error": "invalid event name", "status": 400}
    assert results[6]["error"] == "event too large"
    assert results[6]["status"] == 413
    assert results[6]["limit"] == 256
    assert results[6]["size"] > 300
    assert results[7] == {"error": "event must be an object", "status": 400}
    assert set(results[8]) == {"topic", "id"}
    assert results[9] == {"error": "topic must be a string", "status": 400}
    assert results[10] == {"error": "topic must be a string", "status": 400}
    events = await client.wait_events(2)
    assert [(e.id, e.data) for e in events] == [
        (results[0]["id"], "1"),
        (results[8]["id"], "8"),
    ]
    client.close()


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"nope", 400, "invalid json"),
        (b"[]", 400, "json value is not an object"),
        (b"{}", 400, "missing events"),
        (b'{"events": {}}', 400, "events must be an array"),
        (b'{"events": []} x', 400, "trailing data after json value"),
    ],
)
@pytest.mark.gen_test(timeout=60)
async def test_bad_batch_body(services, body, status, error):
    running = await services.start()
    response = await http("POST", running.url("/topics"), body)
    assert response.code == status
    assert error_of(response) == {"error": error}


@pytest.mark.gen_test(timeout=60)
async def test_batch_of_more_than_1000_items_is_413(services):
    running = await services.start()
    topic = unique_topic()
    items = [{"topic": topic, "data": i} for i in range(1001)]
    response = await http("POST", running.url("/topics"), {"events": items})
    assert response.code == 413
    assert error_of(response) == {
        "error": "too many events",
        "size": 1001,
        "limit": 1000,
    }
    response = await http("POST", running.url("/topics"), {"events": items[:1000]})
    assert response.code == 200
    assert len(json.loads(response.body)["results"]) == 1000


@pytest.mark.gen_test(timeout=60)
async def test_batch_body_over_limit_is_413(services):
    running = await services.start()
    body = b'{"events": []}' + b" " * BODY_LIMIT
    response = await http("POST", running.url("/topics"), body)
    assert response.code == 413
    assert error_of(response) == {
        "error": "request body too large",
        "size": len(body),
        "limit": BODY_LIMIT,
    }
