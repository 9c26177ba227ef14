"""End to end through real Postgres: two instances deliver each other's events."""

from __future__ import annotations

import pytest

from support import publish, subscribe, unique_topic

# The contract holds whichever HTTP server carries it.
pytestmark = pytest.mark.both_servers


@pytest.mark.gen_test(timeout=60)
async def test_two_instances_deliver_each_others_events(services, pg_dsn):
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    sub_a = await subscribe(a, topic)
    sub_b = await subscribe(b, topic)
    first = await publish(a, topic, {"n": 1})
    second = await publish(b, topic, {"n": 2})
    third_id = await a.service.publish(topic, {"n": 3})
    for client in (sub_a, sub_b):
        events = await client.wait_events(3)
        assert [e.json for e in events] == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert [e.id for e in events] == [first["id"], second["id"], third_id]
        client.close()


@pytest.mark.gen_test(timeout=30)
async def test_embedded_broker_delivers(services):
    a = await services.start()
    topic = unique_topic()
    client = await subscribe(a, topic)
    body = await publish(a, topic, [1, {"x": "y"}])
    events = await client.wait_events(1)
    assert events[0].data == '[1,{"x":"y"}]'
    assert events[0].id == body["id"]
    client.close()
