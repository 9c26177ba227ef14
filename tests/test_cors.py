"""What a browser needs besides the stream itself: CORS for pages on other
origins, and the listen token as ``access_token`` query parameter (an
``EventSource`` cannot send headers), which never reaches a log line."""

from __future__ import annotations

import json
import logging

import pytest

from support import SSEClient, http, publish, subscribe, unique_topic

# The contract holds whichever HTTP server carries it.
pytestmark = pytest.mark.both_servers

APP = "http://app.example:8000"
OTHER = "https://other.example"
JSON_FROM_APP = {"Origin": APP, "Content-Type": "application/json"}


def _cors(headers) -> dict[str, str]:
    return {
        k.lower(): v
        for k, v in headers.get_all()
        if k.lower().startswith("access-control-")
    }


async def _preflight(
    running, path: str, origin: str, request_headers: str = "last-event-id"
):
    return await http(
        "OPTIONS",
        running.url(path),
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": request_headers,
        },
    )


@pytest.mark.gen_test(timeout=30)
async def test_preflight_for_a_listed_origin_allows_methods_headers_and_credentials(
    services,
):
    a = await services.start(cors_origins=(APP,))
    topic = unique_topic()
    response = await _preflight(
        a,
        f"/topics/{topic}/events",
        APP,
        "last-event-id, x-requested-with, bad header!",
    )
    assert response.code == 204
    cors = _cors(response.headers)
    assert cors["access-control-allow-origin"] == APP
    assert cors["access-control-allow-credentials"] == "true"
    assert {m.strip() for m in cors["access-control-allow-methods"].split(",")} == {
        "GET",
        "POST",
        "OPTIONS",
    }
    allowed = {
        h.strip().lower() for h in cors["access-control-allow-headers"].split(",")
    }
    assert {
        "last-event-id",
        "authorization",
        "content-type",
        "x-requested-with",
    } <= allowed
    assert not any(" " in h or "!" in h for h in allowed)
    assert int(cors["access-control-max-age"]) > 0
    assert "Origin" in response.headers.get_list("Vary")

    batch = await _preflight(a, "/topics", APP)
    assert batch.code == 204
    assert {
        m.strip()
        for m in _cors(batch.headers)["access-control-allow-methods"].split(",")
    } == {
        "POST",
        "OPTIONS",
    }


@pytest.mark.gen_test(timeout=30)
async def test_wildcard_allows_every_origin_but_never_credentials(services):
    a = await services.start(cors_origins=("*",))
    response = await _preflight(a, f"/topics/{unique_topic()}/events", OTHER)
    assert response.code == 204
    cors = _cors(response.headers)
    assert cors["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in cors
    assert "GET" in cors["access-control-allow-methods"]

    # An exact entry next to the wildcard gets its origin echoed, with
    # credentials; everyone else still gets the wildcard.
    b = await services.start(cors_origins=("*", APP))
    listed = _cors((await _preflight(b, "/topics", APP)).headers)
    assert listed["access-control-allow-origin"] == APP
    assert listed["access-control-allow-credentials"] == "true"
    unlisted = _cors((await _preflight(b, "/topics", OTHER)).headers)
    assert unlisted["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in unlisted


@pytest.mark.gen_test(timeout=30)
async def test_unlisted_origin_and_unconfigured_server_send_no_cors_headers(services):
    listed = await services.start(cors_origins=(APP,))
    plain = await services.start()
    topic = unique_topic()
    for running, origin in ((listed, OTHER), (listed, "null"), (plain, APP)):
        preflight = await _preflight(running, f"/topics/{topic}/events", origin)
        assert preflight.code == 204
        assert _cors(preflight.headers) == {}
        assert preflight.headers.get("Allow") == "GET, POST, OPTIONS"
        stream = await subscribe(running, topic, {"Origin": origin})
        assert stream.status == 200
        assert not any(k.startswith("access-control-") for k in stream.response_headers)
        stream.close()
        posted = await http(
            "POST",
            running.url(f"/topics/{topic}/events"),
            {"data": 1},
            headers={"Origin": origin, "Content-Type": "application/json"},
        )
        assert posted.code == 200
        assert _cors(posted.headers) == {}


@pytest.mark.gen_test(timeout=30)
async def test_streams_publishes_and_errors_carry_cors_headers_for_a_listed_origin(
    services,
):
    a = await services.start(cors_origins=(APP,), publish_token="pub-token")
    topic = unique_topic()
    stream = await subscribe(a, topic, {"Origin": APP})
    assert stream.response_headers["access-control-allow-origin"] == APP
    assert stream.response_headers["access-control-allow-credentials"] == "true"
    assert stream.response_headers["content-type"] == "text/event-stream; charset=utf-8"

    posted = await http(
        "POST",
        a.url(f"/topics/{topic}/events"),
        {"data": {"ok": True}},
        headers={**JSON_FROM_APP, "Authorization": "Bearer pub-token"},
    )
    assert posted.code == 200
    assert _cors(posted.headers)["access-control-allow-origin"] == APP
    assert (await stream.wait_events(1))[0].json == {"ok": True}

    # A page must be able to read why a request failed.
    for body, headers, status in (
        ({"data": 1}, {}, 401),
        ({"nodata": 1}, {"Authorization": "Bearer pub-token"}, 400),
    ):
        failed = await http(
            "POST",
            a.url(f"/topics/{topic}/events"),
            body,
            headers={**JSON_FROM_APP, **headers},
        )
        assert failed.code == status
        assert _cors(failed.headers)["access-control-allow-origin"] == APP
        assert "error" in json.loads(failed.body)
    stream.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_web_page_can_publish_only_a_body_declared_json(services):
    # A page of any origin can send a form or text/plain body without a
    # preflight; refused, it never reaches the broker. Clients that are not
    # pages (no Origin) may send any content type, as curl -d does.
    a = await services.start(cors_origins=(APP,))
    topic = unique_topic()
    stream = await subscribe(a, topic)
    single = a.url(f"/topics/{topic}/events")
    batch = a.url("/topics")
    one = {"data": "page"}
    many = {"events": [{"topic": topic, "data": "page"}]}
    for origin in (OTHER, APP, "null"):
        for content_type in (
            "text/plain",
            "text/plain; charset=utf-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/+json",
            "",
        ):
            for url, body in ((single, one), (batch, many)):
                headers = {"Origin": origin, "Content-Type": content_type}
                refused = await http("POST", url, body, headers=headers)
                assert refused.code == 415, (origin, content_type, url)
                assert json.loads(refused.body) == {
                    "error": "a publish from a web page must be application/json"
                }
    assert a.service.dispatcher.received == 0
    accepted = []
    for content_type in (
        "application/json",
        "Application/JSON; charset=utf-8",
        "application/merge-patch+json",
    ):
        headers = {"Origin": OTHER, "Content-Type": content_type}
        answer = await http("POST", single, {"data": content_type}, headers=headers)
        assert answer.code == 200, content_type
        accepted.append(content_type)
    answer = await http(
        "POST",
        batch,
        {"events": [{"topic": topic, "data": "batch"}]},
        headers={"Origin": APP, "Content-Type": "application/json"},
    )
    assert json.loads(answer.body)["results"][0]["topic"] == topic
    plain = await http(
        "POST", single, {"data": "curl"}, headers={"Content-Type": "text/plain"}
    )
    assert plain.code == 200
    events = await stream.wait_events(5)
    assert [e.json for e in events] == [*accepted, "batch", "curl"]
    stream.close()


@pytest.mark.gen_test(timeout=30)
async def test_listen_token_as_access_token_query_parameter(services):
    a = await services.start(
        listen_token="listen-secret", publish_token="publish-secret"
    )
    topic = unique_topic()
    by_query = await subscribe(a, topic, query="?access_token=listen-secret")
    by_header = await subscribe(a, topic, {"Authorization": "Bearer listen-secret"})
    assert by_query.status == by_header.status == 200
    posted = await http(
        "POST",
        a.url(f"/topics/{topic}/events"),
        {"data": "hi"},
        headers={"Authorization": "Bearer publish-secret"},
    )
    assert posted.code == 200
    for client in (by_query, by_header):
        assert (await client.wait_events(1))[0].json == "hi"
        client.close()

    for query, headers in (
        ("", {}),
        ("?access_token=wrong", {}),
        ("?access_token=", {}),
        ("?access_token=publish-secret", {}),
        # A header, when present, is the one that counts.
        ("?access_token=listen-secret", {"Authorization": "Bearer wrong"}),
    ):
        denied = await http(
            "GET", a.url(f"/topics/{topic}/events{query}"), headers=headers
        )
        assert denied.code == 401, (query, headers)
        assert denied.headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(denied.body) == {"error": "unauthorized"}

    # The query parameter is for the listen token only, never for publishing.
    refused = await http(
        "POST",
        a.url(f"/topics/{topic}/events?access_token=publish-secret"),
        {"data": 1},
    )
    assert refused.code == 401


@pytest.mark.gen_test(timeout=60)
async def test_query_strings_never_reach_the_logs(services, caplog):
    caplog.set_level(logging.DEBUG)
    a = await services.start(listen_token="tok-7f3a9c", cors_origins=(APP,))
    topic = unique_topic()
    marker = "qs-marker-5d1e"
    stream = await SSEClient(
        a.port,
        f"/topics/{topic}/events?access_token=tok-7f3a9c&last_event_id={marker}",
    ).connect()
    assert stream.status == 200
    await publish(a, topic, 1)
    await stream.wait_events(1)
    stream.close()
    for method, path in (
        ("GET", f"/topics/{topic}/events?access_token=tok-wrong-{marker}"),
        (
            "GET",
            f"/topics/{topic},Bad%20Topic/events?access_token=tok-7f3a9c&x={marker}",
        ),
        ("GET", f"/nowhere?access_token=tok-7f3a9c&x={marker}"),
        ("POST", f"/topics/{topic}/events?access_token=tok-7f3a9c&x={marker}"),
        ("OPTIONS", f"/topics/{topic}/events?access_token=tok-7f3a9c&x={marker}"),
        ("DELETE", f"/topics/{topic}/events?access_token=tok-7f3a9c&x={marker}"),
        ("GET", f"/healthz?access_token=tok-7f3a9c&x={marker}"),
    ):
        response = await http(
            method,
            a.url(path),
            {"data": 1} if method == "POST" else None,
            headers={"Origin": APP},
        )
        assert response.code < 500, (method, path)
    await services.close_all()

    lines = [r.getMessage() for r in caplog.records]
    assert any(" 400 " in line for line in lines)
    assert any(topic in line for line in lines if "access" in line or "GET" in line)
    leaks = [line for line in lines if "tok-" in line or marker in line or "?" in line]
    assert leaks == []
