"""`ssepg.Service` end to end: instances on one database deliver each
other's events to SSE subscribers, and the embedded broker does the same for
one instance. Also the Python API of the service."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web

from ssepg import BrokerError, InvalidTopic, PayloadTooLarge, Service
from ssepg.handlers import BatchPublishHandler, HealthHandler, TopicEventsHandler

from support import (
    Running,
    SSEClient,
    http,
    publish,
    subscribe,
    unique_topic,
    wait_until,
)

BURST = 1000


async def publish_burst(instances: list[Running], topic: str, count: int) -> list[str]:
    """Publish ``{"n": 0..count-1}`` all at once, half by HTTP POST and half
    by `Service.publish`, spread over *instances*; returns the ids."""

    async def one(n: int) -> str:
        target = instances[n % len(instances)]
        if n % 4 < 2:
            return (await publish(target, topic, {"n": n}))["id"]
        return await target.service.publish(topic, {"n": n})

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def assert_same_complete_order(
    clients: list[SSEClient], running: Running, topic: str, ids: list[str]
) -> None:
    """Every client got each id exactly once, all in one order; a marker
    published afterwards comes right after them (nothing duplicated late)."""
    for client in clients:
        await client.wait_events(len(ids), timeout=90)
    marker = await running.service.publish(topic, "marker")
    orders = []
    for client in clients:
        events = await client.wait_events(len(ids) + 1, timeout=60)
        assert len(events) == len(ids) + 1
        assert events[-1].id == marker
        order = [e.id for e in events[:-1]]
        assert len(set(order)) == len(ids), "duplicate events"
        assert set(order) == set(ids)
        assert sorted(json.loads(e.data)["n"] for e in events[:-1]) == list(
            range(len(ids))
        )
        orders.append(order)
    for order in orders[1:]:
        assert order == orders[0]


# Several instances on one database -------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_post_and_publish_on_each_instance_reach_subscribers_on_both(
    services, pg_dsn
):
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    assert a.port != b.port
    assert a.service.instance_id != b.service.instance_id
    topic = unique_topic()
    clients = [await subscribe(a, topic), await subscribe(b, topic)]
    ids = [
        (await publish(a, topic, {"from": "a", "via": "http"}))["id"],
        (await publish(b, topic, {"from": "b", "via": "http"}))["id"],
        await a.service.publish(topic, {"from": "a", "via": "api"}),
        await b.service.publish(topic, {"from": "b", "via": "api"}, event="api"),
    ]
    for client in clients:
        events = await client.wait_events(4)
        assert [e.id for e in events] == ids
        assert [e.json for e in events] == [
            {"from": "a", "via": "http"},
            {"from": "b", "via": "http"},
            {"from": "a", "via": "api"},
            {"from": "b", "via": "api"},
        ]
        assert [e.event for e in events] == ["message"] * 3 + ["api"]
        client.close()


@pytest.mark.gen_test(timeout=120)
async def test_topics_stay_isolated_across_instances(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    one, two = unique_topic("one"), unique_topic("two")
    subs_one = [await subscribe(a, one), await subscribe(b, one)]
    subs_two = [await subscribe(a, two), await subscribe(b, two)]
    for n in range(5):
        await publish(a if n % 2 else b, one, n)
    # Postgres delivers in commit order: once the marker on `two` arrived,
    # anything of `one` would have arrived before it.
    marker = await a.service.publish(two, "marker")
    for client in subs_two:
        events = await client.wait_events(1)
        assert [(e.id, e.data) for e in events] == [(marker, '"marker"')]
    last = await b.service.publish(one, "last")
    for client in subs_one:
        events = await client.wait_events(6)
        assert [e.data for e in events] == ["0", "1", "2", "3", "4", '"last"']
        assert events[-1].id == last
    for client in subs_one + subs_two:
        client.close()


@pytest.mark.gen_test(timeout=120)
async def test_five_subscribers_on_one_topic_all_receive(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    clients = [await subscribe(a, topic) for _ in range(5)]
    clients += [await subscribe(b, topic) for _ in range(5)]
    assert a.service.dispatcher.stream_count == 5
    ids = [(await publish(b, topic, n))["id"] for n in range(3)]
    ids.append(await a.service.publish(topic, 3))
    for client in clients:
        events = await client.wait_events(4)
        assert [e.id for e in events] == ids
        assert [e.data for e in events] == ["0", "1", "2", "3"]
        client.close()


@pytest.mark.gen_test(timeout=300)
async def test_burst_arrives_complete_and_in_one_order_on_both_instances(
    services, pg_dsn
):
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    clients = [await subscribe(a, topic), await subscribe(a, topic)]
    clients += [await subscribe(b, topic), await subscribe(b, topic)]
    ids = await publish_burst([a, b], topic, BURST)
    assert len(set(ids)) == BURST
    await assert_same_complete_order(clients, a, topic, ids)
    # Each instance counted what went through it.
    published = [s.service.health()["totals"]["published"] for s in (a, b)]
    assert sum(published) == BURST + 1
    for client in clients:
        client.close()


@pytest.mark.gen_test(timeout=300)
async def test_large_batches_keep_their_order_through_postgres(services, pg_dsn):
    # A batch this large brings a second publish connection in; the batch
    # must still reach subscribers in the order of its items.
    running = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    client = await subscribe(running, topic)
    expected = []
    for round_ in range(5):
        events = [{"topic": topic, "data": round_ * 1000 + n} for n in range(1000)]
        response = await http("POST", running.url("/topics"), {"events": events})
        assert response.code == 200, response.body
        results = json.loads(response.body)["results"]
        assert all("id" in r for r in results)
        expected += [e["data"] for e in events]
    got = await client.wait_events(len(expected), timeout=120)
    assert [e.json for e in got] == expected
    client.close()


# One instance on the embedded broker -------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_embedded_post_and_publish_reach_subscribers(services):
    running = await services.start()
    assert running.service.broker.kind == "memory"
    topic = unique_topic()
    clients = [await subscribe(running, topic) for _ in range(2)]
    ids = [
        (await publish(running, topic, {"via": "http"}))["id"],
        await running.service.publish(topic, {"via": "api"}, event="api"),
    ]
    for client in clients:
        events = await client.wait_events(2)
        assert [(e.id, e.event, e.json) for e in events] == [
            (ids[0], "message", {"via": "http"}),
            (ids[1], "api", {"via": "api"}),
        ]
        client.close()


@pytest.mark.gen_test(timeout=60)
async def test_embedded_topics_stay_isolated(services):
    running = await services.start()
    one, two = unique_topic("one"), unique_topic("two")
    sub_one = await subscribe(running, one)
    sub_two = await subscribe(running, two)
    await publish(running, one, 1)
    await running.service.publish(one, 2)
    marker = await running.service.publish(two, "marker")
    assert [(e.id, e.data) for e in await sub_two.wait_events(1)] == [
        (marker, '"marker"')
    ]
    assert [e.data for e in await sub_one.wait_events(2)] == ["1", "2"]
    end = await running.service.publish(one, 3)
    events = await sub_one.wait_events(3)
    assert events[-1].id == end
    assert [e.data for e in sub_two.data_events()] == ['"marker"']
    sub_one.close()
    sub_two.close()


@pytest.mark.gen_test(timeout=60)
async def test_embedded_five_subscribers_all_receive(services):
    running = await services.start()
    topic = unique_topic()
    clients = [await subscribe(running, topic) for _ in range(5)]
    ids = [(await publish(running, topic, n))["id"] for n in range(3)]
    for client in clients:
        events = await client.wait_events(3)
        assert [e.id for e in events] == ids
        client.close()


@pytest.mark.gen_test(timeout=180)
async def test_embedded_burst_arrives_complete_and_in_one_order(services):
    running = await services.start()
    topic = unique_topic()
    clients = [await subscribe(running, topic) for _ in range(4)]
    ids = await publish_burst([running], topic, BURST)
    assert len(set(ids)) == BURST
    await assert_same_complete_order(clients, running, topic, ids)
    for client in clients:
        client.close()


# The Python API ----------------------------------------------------------------


@pytest.mark.allow_warnings  # the 404 below is logged
@pytest.mark.gen_test(timeout=60)
async def test_routes_are_handler_tuples_under_the_configured_paths(services):
    running = await services.start(base_path="/api/sse", healthz="/api/health")
    service = running.service
    routes = service.routes()
    by_handler = {handler: (pattern, kwargs) for pattern, handler, kwargs in routes}
    assert by_handler[TopicEventsHandler][0].startswith("/api/sse/")
    assert by_handler[BatchPublishHandler][0] == "/api/sse"
    assert by_handler[HealthHandler][0] == "/api/health"
    for _pattern, handler, kwargs in routes:
        assert issubclass(handler, tornado.web.RequestHandler)
        assert kwargs["service"] is service
    topic = unique_topic()
    client = await SSEClient(running.port, f"/api/sse/{topic}/events").connect()
    response = await http("POST", running.url(f"/api/sse/{topic}/events"), {"data": 1})
    assert response.code == 200
    assert (await client.wait_events(1))[0].data == "1"
    assert (await http("GET", running.url("/api/health"))).code == 200
    assert (
        await http("POST", running.url(f"/topics/{topic}/events"), {"data": 1})
    ).code == 404
    client.close()


class HelloHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"hello": self.get_query_argument("name", "world")})


@pytest.mark.gen_test(timeout=60)
async def test_attach_adds_routes_to_an_existing_application(services):
    running = await services.start()
    service = running.service
    app = tornado.web.Application([(r"/hello", HelloHandler)])
    service.attach(app)
    server = tornado.httpserver.HTTPServer(app)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    own = Running(service, port)
    try:
        response = await http("GET", own.url("/hello?name=ssepg"))
        assert response.code == 200
        assert json.loads(response.body) == {"hello": "ssepg"}
        topic = unique_topic()
        client = await subscribe(own, topic)
        body = await publish(own, topic, {"x": [1]})
        events = await client.wait_events(1)
        assert (events[0].id, events[0].data) == (body["id"], '{"x":[1]}')
        health = await http("GET", own.url("/healthz"))
        assert health.code == 200
        assert json.loads(health.body)["status"] == "ok"
        assert (await http("GET", own.url("/hello"))).code == 200
        client.close()
    finally:
        server.stop()
        await server.close_all_connections()


class FormHandler(tornado.web.RequestHandler):
    def post(self) -> None:
        self.write({"posted": True})


@pytest.mark.gen_test(timeout=60)
async def test_routes_work_in_an_application_with_xsrf_cookies(services):
    running = await services.start()
    service = running.service
    app = tornado.web.Application(
        [(r"/form", FormHandler)], xsrf_cookies=True, cookie_secret="s"
    )
    service.attach(app)
    server = tornado.httpserver.HTTPServer(app)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    own = Running(service, sockets[0].getsockname()[1])
    try:
        # The application's own form keeps its guard ...
        assert (await http("POST", own.url("/form"), b"a=1")).code == 403
        # ... while an API client publishes without the cookie.
        topic = unique_topic()
        client = await subscribe(own, topic)
        body = await publish(own, topic, "single")
        batch = await http(
            "POST", own.url("/topics"), {"events": [{"topic": topic, "data": "batch"}]}
        )
        assert batch.code == 200, batch.body
        events = await client.wait_events(2)
        assert [e.json for e in events] == ["single", "batch"]
        assert events[0].id == body["id"]
        client.close()
    finally:
        server.stop()
        await server.close_all_connections()


@pytest.mark.gen_test(timeout=60)
async def test_publish_checks_its_arguments(services):
    running = await services.start(max_notify_bytes=256)
    service = running.service
    topic = unique_topic()
    for bad in ("", "a" * 129, "a/b", "a b", "..", "caf\u00e9", "\u212a", "a\n"):
        with pytest.raises(InvalidTopic):
            await service.publish(bad, 1)
    with pytest.raises(ValueError, match="None"):
        await service.publish(topic, None)
    for bad_event in ("", "a b", "e" * 65, "\u00e9"):
        with pytest.raises(ValueError, match="invalid event name"):
            await service.publish(topic, 1, event=bad_event)
    with pytest.raises(ValueError):
        await service.publish(topic, float("inf"))
    with pytest.raises(TypeError):
        await service.publish(topic, {1, 2})
    with pytest.raises(PayloadTooLarge) as info:
        await service.publish(topic, "x" * 300)
    assert info.value.limit == 256
    assert info.value.size > 300
    # Upper case is folded; falsy data other than None is fine.
    client = await subscribe(running, topic)
    for value in (0, "", [], {}, False):
        await service.publish(topic.upper(), value)
    events = await client.wait_events(5)
    assert [e.data for e in events] == ["0", '""', "[]", "{}", "false"]
    client.close()


@pytest.mark.gen_test(timeout=60)
async def test_close_is_idempotent_and_ends_streams(services):
    running = await services.start()
    service = running.service
    topic = unique_topic()
    client = await subscribe(running, topic)
    await service.publish(topic, 1)
    await client.wait_events(1)
    await asyncio.gather(service.close(drain=0), service.close(drain=0))
    await service.close()
    assert service.is_closed
    await client.wait_closed()
    assert "server shutting down" in client.comments
    with pytest.raises(BrokerError):
        await service.publish(topic, 2)
    assert service.health()["status"] == "degraded"


async def backend_alive(dsn: str, pid: int) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
        )
        row: Any = await cur.fetchone()
        return bool(row[0])


@pytest.mark.gen_test(timeout=120)
async def test_close_with_postgres_is_idempotent_and_releases_the_listener(
    services, pg_dsn
):
    running = await services.start(dsn=pg_dsn)
    service = running.service
    pid = service.broker.listener_pid
    assert pid is not None
    assert await backend_alive(pg_dsn, pid)
    await service.close(drain=0)
    await service.close(drain=0)
    assert service.is_closed
    assert not service.broker.is_connected

    async def gone() -> bool:
        return not await backend_alive(pg_dsn, pid)

    await wait_until(gone, message="listener backend gone")
    with pytest.raises(BrokerError):
        await service.publish(unique_topic(), 1)


@pytest.mark.gen_test(timeout=60)
async def test_start_without_config_reads_the_environment(monkeypatch, io_loop):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("SSEPG_BASE_PATH", "/env-topics")
    service = await Service.start()
    try:
        assert service.config.base_path == "/env-topics"
        assert service.broker.kind == "memory"
        assert service.is_healthy
    finally:
        await service.close(drain=0)
