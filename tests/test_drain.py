"""Graceful drain: not ready at once, busy answers and 503s, streams closed
with a jittered retry spread over ``graceful_drain``, then every connection
released; SIGTERM and SIGINT in the servers (design, section 9)."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import zlib

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ssepg import BrokerError

from support import SSEClient, http, publish, subscribe, unique_topic, wait_until

# Publishes refused while draining log WARNING access lines.
pytestmark = pytest.mark.allow_warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent


async def ssepg_backends(dsn: str) -> set[int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'ssepg'"
        )
        return {row[0] for row in await cur.fetchall()}


async def gzip_stream(port: int, path: str) -> tuple[asyncio.Task[bytes], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")

    async def rest() -> bytes:
        body = await reader.read()
        writer.close()
        return body

    return asyncio.ensure_future(rest()), head


@pytest.mark.gen_test(timeout=90)
async def test_drain_refuses_new_work_and_closes_streams_spread_out(services, pg_dsn):
    drain = 2.4
    tasks_before = len(asyncio.all_tasks())
    backends_before = await ssepg_backends(pg_dsn)
    a = await services.start(dsn=pg_dsn, graceful_drain=drain, queue_poll_interval=0.1)
    service = a.service
    topic = unique_topic()
    streams = [await subscribe(a, topic) for _ in range(3)]
    gzipped, head = await gzip_stream(a.port, f"/topics/{topic}/events")
    assert b"Content-Encoding: gzip" in head
    await publish(a, topic, "before")
    for client in streams:
        await client.wait_events(1)
    await wait_until(lambda: service.broker.queue_usage is not None)
    # A burst opens the publish connections too (the LISTEN connection
    # takes one batch at a time).
    burst = unique_topic()
    await asyncio.gather(*(publish(a, burst, n) for n in range(40)))
    ours = await ssepg_backends(pg_dsn) - backends_before
    # Listener, monitor and at least one publish connection.
    assert len(ours) >= 3 and service.broker.listener_pid in ours

    closing = asyncio.ensure_future(service.close())
    await wait_until(lambda: service.is_draining)
    # Not ready at once.
    response = await http("GET", a.url("/healthz"))
    assert response.code == 503
    report = json.loads(response.body)
    assert report["status"] == "degraded" and report["draining"] is True
    # New streams get the busy answer, publishes 503.
    late = await subscribe(a, topic)
    assert late.status == 200
    await late.wait_closed()
    assert late.comments == ["server busy"]
    assert "retry-after" in late.response_headers
    response = await http("POST", a.url(f"/topics/{topic}/events"), {"data": 1})
    assert response.code == 503
    assert "error" in json.loads(response.body)
    with pytest.raises(BrokerError):
        await service.publish(topic, "refused")
    # Open streams are closed one after another, not all at once.
    await wait_until(lambda: any(c.closed for c in streams), message="first close")
    assert not all(c.closed for c in streams) or not gzipped.done()
    for client in streams:
        await client.wait_closed()
        assert "server shutting down" in client.comments
        assert client.retry is not None and 1000 <= client.retry <= drain * 1000 + 1000
        assert [e.data for e in client.data_events()] == ['"before"']
    body = await asyncio.wait_for(gzipped, 20)
    inflate = zlib.decompressobj(wbits=31)
    text = inflate.decompress(body).decode()
    assert ": server shutting down\n\n" in text and "\nretry: " in text
    assert inflate.eof and inflate.unused_data == b""

    await asyncio.wait_for(closing, 30)
    assert service.is_closed
    # Every Postgres connection of the service is gone, and no task is left.
    await wait_until(
        lambda: _disjoint(ssepg_backends(pg_dsn), ours),
        message="service connections closed",
    )
    await wait_until(
        lambda: len(asyncio.all_tasks()) <= tasks_before, message="no task left behind"
    )
    # Closing again is harmless.
    await service.close()


async def _disjoint(work, pids: set[int]) -> bool:
    return not (await work) & pids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("command", "signum"),
    [
        (["-m", "ssepg"], signal.SIGTERM),
        (["-m", "ssepg"], signal.SIGINT),
        ([str(ROOT / "examples" / "server.py")], signal.SIGTERM),
        ([str(ROOT / "examples" / "server.py")], signal.SIGINT),
    ],
    ids=[
        "python-m-ssepg-sigterm",
        "python-m-ssepg-sigint",
        "example-sigterm",
        "example-sigint",
    ],
)
@pytest.mark.gen_test(timeout=120)
async def test_server_drains_on_signal_and_exits_zero(
    command, signum, pg_dsn, tmp_path
):
    password, publish_token, listen_token = (
        "Pw-Drain-31",
        "Pub-Drain-41",
        "Lis-Drain-59",
    )
    dsn = make_conninfo(**{**conninfo_to_dict(pg_dsn), "password": password})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSEPG_")}
    env.update(
        DATABASE_URL=dsn,
        SSEPG_GRACEFUL_DRAIN="1s",
        SSEPG_PUBLISH_TOKEN=publish_token,
        SSEPG_LISTEN_TOKEN=listen_token,
        PYTHONUNBUFFERED="1",
    )
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, *command, "--port", str(port), "--host", "127.0.0.1"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:

        async def healthy() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                response = await http(
                    "GET", f"http://127.0.0.1:{port}/healthz", timeout=2
                )
            except OSError:
                return False
            return response.code == 200

        await wait_until(healthy, timeout=40, interval=0.1, message="server healthy")
        topic = unique_topic()
        client = await SSEClient(
            port,
            f"/topics/{topic}/events",
            {"Authorization": f"Bearer {listen_token}"},
        ).connect()
        await client.wait_comment(f"listening {topic}")
        response = await http(
            "POST",
            f"http://127.0.0.1:{port}/topics/{topic}/events",
            {"data": "hi"},
            headers={"Authorization": f"Bearer {publish_token}"},
        )
        assert response.code == 200
        await client.wait_events(1)
        proc.send_signal(signum)
        await client.wait_comment("server shutting down")
        await client.wait_closed()
        assert client.retry is not None and 1000 <= client.retry <= 2000
        await wait_until(lambda: proc.poll() is not None, timeout=40, message="exit")
        assert proc.returncode == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "shutting down" in text and "closed:" in text
    assert "Traceback" not in text
    assert text.count("security:") == 1
    assert "detected " in text and "chose " in text
    for secret in (password, publish_token, listen_token):
        assert secret not in text
