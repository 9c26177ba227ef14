"""Bearer tokens: a publish token and a listen token, each good for its own
side only (design, sections 2 and 10)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from support import SSEClient, http, unique_topic

# Every refused request writes a WARNING access line.
pytestmark = [pytest.mark.allow_warnings, pytest.mark.both_servers]

PUBLISH = "pub-3f9c1e7a"
LISTEN = "lis-84b2d0c5"


def assert_unauthorized(response: Any) -> None:
    assert response.code == 401, (response.code, response.body)
    assert response.headers["WWW-Authenticate"].split()[0] == "Bearer"
    assert response.headers["Cache-Control"] == "no-store"
    assert json.loads(response.body) == {"error": "unauthorized"}


async def post_event(running, topic, headers=None, query=""):
    return await http(
        "POST",
        running.url(f"/topics/{topic}/events{query}"),
        {"data": {"n": 1}},
        headers=headers,
    )


async def open_stream(running, topic, headers=None, query=""):
    client = SSEClient(running.port, f"/topics/{topic}/events{query}", headers)
    return await client.connect()


@pytest.mark.gen_test(timeout=60)
async def test_publish_token_matrix(services, pg_dsn):
    a = await services.start(dsn=pg_dsn, publish_token=PUBLISH, listen_token=LISTEN)
    topic = unique_topic()
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        response = await post_event(a, topic, {"Authorization": f"{scheme} {PUBLISH}"})
        assert response.code == 200, (scheme, response.body)
    refused = [
        None,
        {"Authorization": f"Bearer {LISTEN}"},
        {"Authorization": f"Bearer {PUBLISH}x"},
        {"Authorization": f"Bearer {PUBLISH[:-1]}"},
        {"Authorization": f"Basic {PUBLISH}"},
        {"Authorization": PUBLISH},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {PUBLISH} extra"},
    ]
    for headers in refused:
        assert_unauthorized(await post_event(a, topic, headers))
    # The query parameter is for EventSource streams only, never for publishing.
    assert_unauthorized(await post_event(a, topic, query=f"?access_token={PUBLISH}"))
    assert_unauthorized(await post_event(a, topic, query=f"?access_token={LISTEN}"))


@pytest.mark.gen_test(timeout=60)
async def test_batch_publish_needs_the_publish_token(services, pg_dsn):
    a = await services.start(dsn=pg_dsn, publish_token=PUBLISH, listen_token=LISTEN)
    body = {"events": [{"topic": unique_topic(), "data": 1}]}
    ok = await http(
        "POST", a.url("/topics"), body, headers={"Authorization": f"bearer {PUBLISH}"}
    )
    assert ok.code == 200 and "id" in json.loads(ok.body)["results"][0]
    for headers in (None, {"Authorization": f"Bearer {LISTEN}"}):
        assert_unauthorized(await http("POST", a.url("/topics"), body, headers=headers))


@pytest.mark.gen_test(timeout=60)
async def test_listen_token_matrix(services, pg_dsn):
    a = await services.start(dsn=pg_dsn, publish_token=PUBLISH, listen_token=LISTEN)
    topic = unique_topic()
    accepted = [
        ({"Authorization": f"Bearer {LISTEN}"}, ""),
        ({"Authorization": f"BEARER {LISTEN}"}, ""),
        ({"Authorization": f"bearer {LISTEN}"}, ""),
        (None, f"?access_token={LISTEN}"),
        (None, f"?last_event_id=x&access_token={LISTEN}"),
    ]
    clients = []
    for headers, query in accepted:
        client = await open_stream(a, topic, headers, query)
        assert client.status == 200, (headers, query)
        assert client.response_headers["content-type"].startswith("text/event-stream")
        clients.append(client)
    sent = await post_event(a, topic, {"Authorization": f"Bearer {PUBLISH}"})
    event_id = json.loads(sent.body)["id"]
    for client in clients:
        events = await client.wait_events(1)
        assert events[0].id == event_id
        client.close()
    refused = [
        (None, ""),
        ({"Authorization": f"Bearer {PUBLISH}"}, ""),
        ({"Authorization": f"Bearer {LISTEN}0"}, ""),
        ({"Authorization": f"Token {LISTEN}"}, ""),
        (None, f"?access_token={PUBLISH}"),
        (None, "?access_token="),
        (None, f"?access_token={LISTEN[:-2]}"),
        # A header, when present, decides: a wrong one is not rescued by the
        # query parameter.
        ({"Authorization": f"Bearer {PUBLISH}"}, f"?access_token={LISTEN}"),
    ]
    for headers, query in refused:
        response = await http(
            "GET", a.url(f"/topics/{topic}/events{query}"), headers=headers
        )
        assert_unauthorized(response)


@pytest.mark.gen_test(timeout=60)
async def test_each_token_protects_only_its_own_side(services, pg_dsn):
    only_publish = await services.start(dsn=pg_dsn, publish_token=PUBLISH)
    only_listen = await services.start(dsn=pg_dsn, listen_token=LISTEN)
    topic = unique_topic()
    open_stream_client = await open_stream(only_publish, topic)
    assert open_stream_client.status == 200
    assert_unauthorized(await post_event(only_publish, topic))
    assert_unauthorized(await http("GET", only_listen.url(f"/topics/{topic}/events")))
    # Publishing is open there, with or without any token.
    assert (await post_event(only_listen, topic)).code == 200
    assert (
        await post_event(only_listen, topic, {"Authorization": "Bearer x"})
    ).code == 200
    events = await open_stream_client.wait_events(2)
    assert len(events) == 2
    open_stream_client.close()


@pytest.mark.gen_test(timeout=60)
async def test_preflight_and_health_need_no_token(services, pg_dsn):
    a = await services.start(
        dsn=pg_dsn,
        publish_token=PUBLISH,
        listen_token=LISTEN,
        cors_origins=("https://app.example",),
    )
    response = await http(
        "OPTIONS",
        a.url(f"/topics/{unique_topic()}/events"),
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.code == 204
    assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()
    assert (await http("GET", a.url("/healthz"))).code == 200
    assert (await http("GET", a.url("/metrics"))).code == 200


@pytest.mark.gen_test(timeout=60)
async def test_tokens_never_reach_the_logs(services, pg_dsn, caplog):
    caplog.set_level(logging.DEBUG)
    a = await services.start(dsn=pg_dsn, publish_token=PUBLISH, listen_token=LISTEN)
    topic = unique_topic()
    client = await open_stream(a, topic, query=f"?access_token={LISTEN}")
    await post_event(a, topic, {"Authorization": f"Bearer {PUBLISH}"})
    await client.wait_events(1)
    await post_event(a, topic, {"Authorization": f"Bearer {LISTEN}"})
    await http("GET", a.url(f"/topics/{topic}/events?access_token={PUBLISH}"))
    client.close()
    await a.service.close(drain=0)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "/topics/" in text  # the access lines were captured
    assert PUBLISH not in text and LISTEN not in text
