"""Faults injected for real: a killed or silently dead LISTEN connection,
Postgres down at start, a LISTEN that never hears, publish errors caused by
clients, clients that vanish, and a reader that freezes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import time
import tracemalloc
from typing import Any

import psutil
import psycopg
import pytest

from ssepg import broker as broker_module
from ssepg import hub as hub_module
from ssepg import pgconn
from ssepg import publisher as publisher_module
from ssepg.service import bound_port

from relay import Relay
from support import (
    DEADLINE_S,
    SSEClient,
    SSEEvent,
    http,
    publish,
    subscribe,
    unique_topic,
    wait_until,
)


async def health(running: Any) -> tuple[int, dict[str, Any]]:
    response = await http("GET", running.url("/healthz"))
    return response.code, json.loads(response.body)


class ListenerWatch:
    """Records the listener's up and down transitions as they happen (a poll
    could miss a short outage)."""

    def __init__(self, service: Any) -> None:
        self.changes: list[tuple[float, bool]] = []
        self.went_down = asyncio.Event()
        self.came_up = asyncio.Event()
        broker = service.broker
        inner = broker._on_change

        def on_change(is_up: bool) -> None:
            self.changes.append((time.monotonic(), is_up))
            (self.came_up if is_up else self.went_down).set()
            if inner is not None:
                inner(is_up)

        broker._on_change = on_change

    def first_down_after(self, start: float) -> float:
        return next(t for t, up in self.changes if not up and t >= start) - start


def terminate_backend(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
    assert row == (True,)


async def open_streams(running: Any, topic: str) -> list[SSEClient]:
    """A plain, a gzip and a multi-topic stream on *topic*."""
    return [
        await subscribe(running, topic),
        await subscribe(running, topic, {"Accept-Encoding": "gzip"}),
        await subscribe(running, f"{topic},{unique_topic()}"),
    ]


def gap_count(client: SSEClient) -> int:
    return sum(1 for e in client.events if e.event == "ssepg-gap")


def _payload(event: SSEEvent) -> Any:
    payload = event.json
    if isinstance(payload, dict) and "topic" in payload and "data" in payload:
        payload = payload["data"]  # a multi-topic stream's frame
    return payload


async def check_streams_recovered(
    running: Any,
    topic: str,
    clients: list[SSEClient],
    before: int,
    unconfirmed: tuple[Any, ...] = (),
) -> None:
    """Every stream got one ``ssepg-gap`` and then receives a new event.

    *unconfirmed* holds the data of publishes answered 503 during the
    outage: one already on its way over a frozen path may still commit when
    the path heals (a timeout cannot take it back), so each may arrive once
    before the new event; nothing else may."""
    for client in clients:

        def has_gap(c: SSEClient = client) -> bool:
            return gap_count(c) >= 1

        await wait_until(has_gap, message="ssepg-gap frame")
        assert gap_count(client) == 1
        assert not client.closed
    body = await publish(running, topic, {"after": "reconnect"})
    for client in clients:

        def arrived(c: SSEClient = client) -> bool:
            return any(e.id == body["id"] for e in c.data_events())

        await wait_until(arrived, message="the event published after the outage")
        events = client.data_events()
        last = events[-1]
        assert last.id == body["id"]
        assert _payload(last) == {"after": "reconnect"}
        late = [_payload(e) for e in events[before:-1]]
        assert all(late.count(p) <= 1 and p in unconfirmed for p in late), late
        # The gap frame comes before the event published after the outage.
        kinds = [e.event for e in client.events]
        assert kinds.index("ssepg-gap") < len(kinds) - 1
        client.close()


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=60)
async def test_killed_listener_backend_reconnects_and_signals_gap(services, pg_dsn):
    running = await services.start(dsn=pg_dsn)
    service = running.service
    watch = ListenerWatch(service)
    topic = unique_topic()
    clients = await open_streams(running, topic)
    await publish(running, topic, {"before": 1})
    for client in clients:
        await client.wait_events(1)
    code, report = await health(running)
    assert (code, report["status"], report["listen_connected"]) == (200, "ok", True)
    attempts = report["reconnect_attempts"]
    old_pid = service.broker.listener_pid
    in_process = service.dispatcher.subscribe(topic)

    killed_at = time.monotonic()
    terminate_backend(pg_dsn, old_pid)
    await asyncio.wait_for(watch.went_down.wait(), 20)
    # The backoff before the first reconnect leaves time to see the outage.
    code, report = await health(running)
    assert code == 503
    assert report["status"] == "degraded"
    assert report["listen_connected"] is False
    assert watch.first_down_after(killed_at) < broker_module.PROBE_INTERVAL_S

    await wait_until(lambda: service.broker.is_connected, message="listener back")
    code, report = await health(running)
    assert (code, report["status"], report["listen_connected"]) == (200, "ok", True)
    assert report["reconnect_attempts"] > attempts
    assert report["listen_error"] is None
    assert service.broker.listener_pid not in (None, old_pid)
    await check_streams_recovered(running, topic, clients, 1)
    # In-process subscriptions are told as well.
    gap = await asyncio.wait_for(in_process.__anext__(), 20)
    after = await asyncio.wait_for(in_process.__anext__(), 20)
    assert (gap.event, gap.id, gap.raw) == ("ssepg-gap", None, "{}")
    assert (after.event, after.data) == ("message", {"after": "reconnect"})
    in_process.close()


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=90)
async def test_silently_dead_listen_path_found_by_probe(services, pg_dsn):
    relay = await Relay().start()
    try:
        running = await services.start(dsn=relay.dsn(pg_dsn))
        service = running.service
        watch = ListenerWatch(service)
        topic = unique_topic()
        clients = await open_streams(running, topic)
        await publish(running, topic, {"before": 1})
        for client in clients:
            await client.wait_events(1)
        attempts = service.broker.reconnect_attempts

        # Every connection through the relay goes silent: no FIN, no RST.
        paused_at = time.monotonic()
        relay.pause()
        await asyncio.wait_for(watch.went_down.wait(), 15.0)
        assert watch.first_down_after(paused_at) <= 15.0
        code, report = await health(running)
        assert (code, report["status"], report["listen_connected"]) == (
            503,
            "degraded",
            False,
        )

        # New connections pass the relay: the listener comes back by itself.
        await wait_until(
            lambda: service.broker.is_connected, timeout=40, message="listener back"
        )
        code, report = await health(running)
        assert (code, report["status"]) == (200, "ok")
        assert report["reconnect_attempts"] > attempts
        await check_streams_recovered(running, topic, clients, 1)
    finally:
        await services.close_all()
        await relay.close()


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=90)
async def test_partition_stays_degraded_until_the_path_heals(services, pg_dsn):
    relay = await Relay().start()
    try:
        timeout = 2.0
        running = await services.start(dsn=relay.dsn(pg_dsn), publish_timeout=timeout)
        service = running.service
        watch = ListenerWatch(service)
        topic = unique_topic()
        client = await subscribe(running, topic)
        await publish(running, topic, {"before": 1})
        await client.wait_events(1)
        attempts = service.broker.reconnect_attempts

        # Open connections freeze and new ones hang: nothing gets through.
        relay.stop_forwarding()
        await asyncio.wait_for(watch.went_down.wait(), 15.0)
        await wait_until(
            lambda: service.broker.reconnect_attempts > attempts,
            message="a reconnect attempt under way",
        )
        started = time.monotonic()
        response = await http(
            "POST", running.url(f"/topics/{topic}/events"), {"data": "lost"}
        )
        assert response.code == 503
        assert set(json.loads(response.body)) == {"error"}
        assert time.monotonic() - started < timeout + 2.0
        code, report = await health(running)
        assert (code, report["status"], report["listen_connected"]) == (
            503,
            "degraded",
            False,
        )

        relay.start_forwarding()
        await wait_until(
            lambda: service.broker.is_connected, timeout=40, message="listener back"
        )
        code, report = await health(running)
        assert (code, report["status"]) == (200, "ok")
        await check_streams_recovered(running, topic, [client], 1, ("lost",))
    finally:
        await services.close_all()
        await relay.close()


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=90)
async def test_start_while_postgres_unreachable_then_recover(services, pg_dsn):
    relay = await Relay(mode="hold").start()
    try:
        timeout = 1.5
        running = await services.start(
            dsn=relay.dsn(pg_dsn),
            wait_listen=False,
            publish_timeout=timeout,
        )
        service = running.service
        code, report = await health(running)
        assert (code, report["status"], report["listen_connected"]) == (
            503,
            "degraded",
            False,
        )

        # Connections hang in the relay's backlog: publishes answer 503
        # within publish_timeout, all of them, none hangs.
        topic = unique_topic()
        url = running.url(f"/topics/{topic}/events")

        async def timed_publish(n: int) -> tuple[int, dict[str, Any], float]:
            started = time.monotonic()
            response = await http("POST", url, {"data": n}, timeout=timeout + 10)
            return response.code, json.loads(response.body), time.monotonic() - started

        results = await asyncio.gather(*(timed_publish(n) for n in range(5)))
        for code, body, elapsed in results:
            assert code == 503
            assert set(body) == {"error"} and body["error"]
            # Bounded by publish_timeout (plus scheduling slack on a busy machine).
            assert elapsed < timeout + 2.0

        # Refused connections: the listener keeps trying, with backoff.
        relay.set_mode("refuse")
        await wait_until(
            lambda: service.broker.reconnect_attempts >= 3,
            timeout=40,
            message="repeated reconnect attempts",
        )
        code, report = await health(running)
        assert (code, report["status"]) == (503, "degraded")
        assert report["reconnect_attempts"] >= 3

        relay.set_mode("forward")
        await wait_until(
            lambda: service.broker.is_connected,
            timeout=40,
            message="listener connected once Postgres is reachable",
        )
        code, report = await health(running)
        assert (code, report["status"], report["listen_connected"]) == (200, "ok", True)
        client = await subscribe(running, topic)
        body = await publish(running, topic, {"up": True})
        events = await client.wait_events(1)
        assert events[0].id == body["id"]
        client.close()
    finally:
        await services.close_all()
        await relay.close()


def test_backoff_grows_and_is_capped():
    delays = [pgconn._backoff(n) for n in range(1, 200)]
    cap = pgconn.BACKOFF_MAX_S * 1.2
    assert all(0 < d <= cap for d in delays)
    assert delays[0] < 1.0
    assert min(delays[50:]) >= pgconn.BACKOFF_MAX_S * 0.8
    assert pgconn._backoff(10**9) <= cap


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=60)
async def test_listen_that_never_hears_is_reported(services, pg_dsn, caplog):
    relay = await Relay().start()
    relay.drop_types.add(b"A")  # NotificationResponse never reaches ssepg
    try:
        with caplog.at_level(logging.ERROR, logger="ssepg.broker"):
            running = await services.start(dsn=relay.dsn(pg_dsn), wait_listen=False)
            service = running.service
            await wait_until(
                lambda: service.broker.listen_error is not None,
                message="round-trip error reported",
            )
            code, report = await health(running)
            assert (code, report["status"], report["listen_connected"]) == (
                503,
                "degraded",
                False,
            )
            assert "did not hear a NOTIFY" in report["listen_error"]
            assert "pooler" in report["listen_error"]
            errors = [
                r
                for r in caplog.records
                if r.name == "ssepg.broker" and r.levelno == logging.ERROR
            ]
            assert any("did not hear a NOTIFY" in r.getMessage() for r in errors)
            assert relay.dropped.get(b"A", 0) >= 1

        # Once notifications flow, the next attempt clears the error.
        relay.drop_types.clear()
        await wait_until(
            lambda: service.broker.is_connected,
            timeout=40,
            message="listener healthy once notifications flow",
        )
        code, report = await health(running)
        assert (code, report["status"], report["listen_error"]) == (200, "ok", None)
    finally:
        await services.close_all()
        await relay.close()


# Raw sockets ------------------------------------------------------------------


async def raw_connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        # Set before connecting so that the advertised window stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def raw_subscribe(
    port: int, topic: str, rcvbuf: int | None = None
) -> socket.socket:
    """A stream opened on a bare socket that nobody reads."""
    sock = await raw_connect(port, rcvbuf)
    request = f"GET /topics/{topic}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    await asyncio.get_running_loop().sock_sendall(sock, request)
    return sock


def close_with_rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class FrameReader:
    """Reads an SSE stream from a bare socket as fast as it comes and checks
    each data event on arrival, keeping next to nothing: the n-th event must
    carry the n-th payload (``"%05d..."``, *size* bytes) and the id after the
    previous one (ids of one instance end in a counter). Parses with bytes
    methods so that it keeps up with megabytes per second on a shared
    IOLoop."""

    def __init__(self, sock: socket.socket, size: int) -> None:
        self.sock = sock
        self.size = size
        self.count = 0
        self.first_id: str | None = None
        self.last_id: str | None = None
        self.errors: list[str] = []
        self.signals: list[bytes] = []
        self.closed = False
        self._buf = b""
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                chunk = await loop.sock_recv(self.sock, 1 << 20)
                if not chunk:
                    break
                self._feed(chunk)
        except OSError:
            pass
        finally:
            self.closed = True

    def _feed(self, chunk: bytes) -> None:
        frames = (self._buf + chunk).split(b"\n\n")
        self._buf = frames.pop()
        for frame in frames:
            if frame.startswith(b"id: "):
                head, _, data = frame.partition(b"\ndata: ")
                event_id = head[4 : head.index(b"\n")].decode()
                self._check(event_id, data)
            elif frame.startswith(b"event: "):
                self.signals.append(frame)

    def _check(self, event_id: str, data: bytes) -> None:
        n = self.count
        if not data.startswith(b'"%05d' % n) or len(data) != self.size:
            self.errors.append(f"event {n}: payload {data[:8]!r}, {len(data)} bytes")
        if self.last_id is not None:
            prefix, _, counter = self.last_id.rpartition("-")
            if event_id != f"{prefix}-{int(counter) + 1}":
                self.errors.append(f"event {n}: id {event_id} after {self.last_id}")
        else:
            self.first_id = event_id
        self.last_id = event_id
        self.count += 1

    def close(self) -> None:
        self._task.cancel()
        self.sock.close()


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


class PeakRSS:
    """Samples this process's RSS every few milliseconds on the IOLoop."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._handle = asyncio.get_running_loop().call_later(0.005, self._sample)

    def _sample(self) -> None:
        self.peak = max(self.peak, rss_bytes())
        self._handle = asyncio.get_running_loop().call_later(0.005, self._sample)

    def stop(self) -> int:
        self._handle.cancel()
        self.peak = max(self.peak, rss_bytes())
        return self.peak


def publish_connection_pids(service: Any) -> list[int]:
    conns = service.broker._publisher._conns
    return [c.conn.pgconn.backend_pid for c in conns if c is not None and c.is_usable]


# Publish errors ----------------------------------------------------------------


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=60)
async def test_client_caused_publish_errors_keep_the_publish_connections(
    services, pg_dsn
):
    running = await services.start(dsn=pg_dsn)
    service = running.service
    topic = unique_topic()
    url = running.url(f"/topics/{topic}/events")
    reader = await subscribe(running, topic)
    # A backlog of publishes while one statement is in flight opens the
    # second publish connection.
    warm = 0

    async def publisher() -> None:
        nonlocal warm
        await service.publish(topic, {"warm": warm})
        warm += 1

    deadline = time.monotonic() + 20
    burst = 2 * publisher_module.EXTRA_CONNECTION_BACKLOG
    while len(publish_connection_pids(service)) < publisher_module.PUBLISH_CONNECTIONS:
        assert time.monotonic() < deadline, "the second publish connection never opened"
        await asyncio.gather(*(publisher() for _ in range(burst)))
    pids = publish_connection_pids(service)
    assert len(pids) == publisher_module.PUBLISH_CONNECTIONS

    async def bad_requests() -> list[int | str]:
        codes: list[int | str] = []
        too_large = {"data": "x" * 8000}
        codes.append((await http("POST", url, too_large)).code)
        codes.append((await http("POST", url, b'{"data":"\xff\xfe"}')).code)
        codes.append((await http("POST", url, b'{"data":1} trailing')).code)
        # Clients hanging up in the middle of a body, with FIN and with RST.
        for rst in (False, True):
            sock = await raw_connect(running.port)
            head = (
                f"POST /topics/{topic}/events HTTP/1.1\r\nHost: x\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            )
            await asyncio.get_running_loop().sock_sendall(
                sock, head.encode() + b'{"data": "abc'
            )
            await asyncio.sleep(0.01)
            if rst:
                close_with_rst(sock)
            else:
                sock.close()
        # Postgres itself refuses an event (a payload past its 8000-byte
        # limit, which only a direct broker call can send): the others of the
        # same batch still go out, on the same connection.
        envelope = b'{"topic":"%s","data":"%s","id":"x-1"}' % (
            topic.encode(),
            b"y" * 9000,
        )
        try:
            await service.broker.publish(topic, "x-1", "message", b'""', envelope)
        except Exception as exc:  # noqa: BLE001 - the kind is checked below
            codes.append(type(exc).__name__)
        return codes

    good = [publish(running, topic, {"good": n}) for n in range(40)]
    results = await asyncio.gather(bad_requests(), *good)
    codes = results[0]
    assert codes == [413, 400, 400, "PublishError"]
    good_ids = [body["id"] for body in results[1:]]
    assert len(set(good_ids)) == 40

    events = await reader.wait_events(warm + 40)
    received = {e.id for e in events}
    assert set(good_ids) <= received
    assert publish_connection_pids(service) == pids
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        alive = {row[0] for row in conn.execute("SELECT pid FROM pg_stat_activity")}
    assert set(pids) <= alive
    after = await publish(running, topic, {"still": "fine"})
    assert (await reader.wait_events(warm + 41))[-1].id == after["id"]
    reader.close()


@pytest.mark.gen_test(timeout=60)
async def test_publisher_sending_its_body_slowly_holds_nothing_back(services, pg_dsn):
    running = await services.start(dsn=pg_dsn)
    dispatcher = running.service.dispatcher
    loop = asyncio.get_running_loop()
    topic = unique_topic()
    client = await subscribe(running, topic)
    sock = await raw_connect(running.port)
    body = b'{"data":"slow"}'
    head = (
        f"POST /topics/{topic}/events HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    await loop.sock_sendall(sock, head + body[:5])
    # While that body dawdles, fan-out waits for nobody: other publishes go
    # out and no hold is left on the dispatcher.
    for n in range(20):
        await publish(running, topic, n)
        assert dispatcher._holds == 0
    assert [e.json for e in await client.wait_events(20)] == list(range(20))
    await loop.sock_sendall(sock, body[5:])
    answer = await asyncio.wait_for(loop.sock_recv(sock, 65536), 20)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert (await client.wait_events(21))[-1].json == "slow"
    sock.close()
    client.close()


# Clients gone ------------------------------------------------------------------


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=90)
async def test_gone_clients_are_removed_without_leaks(services, pg_dsn, monkeypatch):
    # The documented bound is one keep-alive interval plus the write timeout;
    # both are shortened here so that the test waits seconds, not a minute.
    write_timeout = 2.0
    keep_alive = 1.0
    monkeypatch.setattr(hub_module, "WRITE_TIMEOUT_S", write_timeout)
    running = await services.start(
        dsn=pg_dsn, keep_alive=keep_alive, client_buffer=256 * 1024
    )
    service = running.service
    dispatcher = service.dispatcher
    quiet, busy = unique_topic("quiet"), unique_topic("busy")
    keeper = await subscribe(running, f"{quiet},{busy}")
    await asyncio.gather(*(publish(running, quiet, n) for n in range(10)))
    await keeper.wait_events(10)
    await health(running)

    await asyncio.sleep(0.2)
    base_streams = dispatcher.stream_count
    base_fds = open_fds()
    base_tasks = len(asyncio.all_tasks())
    base_dropped = dispatcher.dropped_clients

    fin = [await raw_subscribe(running.port, quiet) for _ in range(20)]
    rst = [await raw_subscribe(running.port, busy) for _ in range(20)]
    silent_quiet = [
        await raw_subscribe(running.port, quiet, rcvbuf=4096) for _ in range(5)
    ]
    silent_busy = [
        await raw_subscribe(running.port, busy, rcvbuf=4096) for _ in range(5)
    ]
    await wait_until(
        lambda: dispatcher.stream_count == base_streams + 50, message="50 streams open"
    )

    for sock in fin:
        sock.close()
    for sock in rst:
        close_with_rst(sock)
    await wait_until(
        lambda: dispatcher.stream_count == base_streams + 10,
        message="FIN and RST clients removed",
    )

    # Traffic fills the silent clients' sockets: about 100 KB on the quiet
    # topic (below client_buffer: only the write timeout can find them),
    # about 1 MB on the busy one (past client_buffer: dropped as slow).
    chunk = "z" * 7000
    stalled_at = time.monotonic()
    for n in range(15):
        await service.publish(quiet, {"n": n, "pad": chunk})
    for n in range(150):
        await service.publish(busy, {"n": n, "pad": chunk})
    bound = keep_alive + write_timeout
    await wait_until(
        lambda: dispatcher.stream_count == base_streams,
        timeout=bound + 10,
        message="silent clients removed",
    )
    assert time.monotonic() - stalled_at < bound + 10
    assert dispatcher.dropped_clients - base_dropped == 10
    await keeper.wait_events(10 + 15 + 150)
    assert not keeper.closed

    # The silent clients vanish for good; nothing is left behind.
    for sock in silent_quiet + silent_busy:
        close_with_rst(sock)
    await wait_until(lambda: open_fds() <= base_fds, message="descriptors released")
    await wait_until(
        lambda: len(asyncio.all_tasks()) <= base_tasks, message="tasks finished"
    )
    code, report = await health(running)
    assert report["totals"]["streams"] == base_streams
    keeper.close()


# Frozen reader -----------------------------------------------------------------


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=120)
async def test_frozen_reader_is_bounded_and_dropped(services, pg_dsn, caplog):
    client_buffer = 1 << 20
    ring_capacity = 1024
    count, size = 5000, 4096
    running = await services.start(
        dsn=pg_dsn, client_buffer=client_buffer, ring_capacity=ring_capacity
    )
    service = running.service
    loop = asyncio.get_running_loop()

    async def healthy_reader(topic: str) -> FrameReader:
        sock = await raw_subscribe(running.port, topic)
        return FrameReader(sock, size)

    async def publish_all(topic: str, n: int) -> tuple[str, str]:
        """Publish *n* events one after the other; the first and last id."""
        pad = b"d" * (size - 7)
        first = last = ""
        for i in range(n):
            last = await service.publish_raw(topic, b'"%05d%s"' % (i, pad))
            first = first or last
        return first, last

    # Warm up the same path on another topic so that the baseline includes
    # the allocator pools a run of this size needs.
    warm = unique_topic("warm")
    warm_reader = await healthy_reader(warm)
    await wait_until(
        lambda: service.dispatcher.stream_count == 1, message="warm stream"
    )
    await publish_all(warm, 1500)
    await wait_until(lambda: warm_reader.count == 1500, message="warm-up delivered")
    warm_reader.close()
    await wait_until(
        lambda: service.dispatcher.stream_count == 0, message="warm stream gone"
    )
    service.dispatcher.remove_idle_topics(0)

    topic = unique_topic("frozen")
    base_rss = rss_bytes()
    peak = PeakRSS()
    # Python-level allocations are where ssepg keeps events and unsent bytes;
    # tracemalloc counts them exactly (RSS adds allocator and libpq noise).
    tracemalloc.start(1)
    try:
        frozen = await raw_subscribe(running.port, topic, rcvbuf=4096)
        reader = await healthy_reader(topic)
        await wait_until(
            lambda: service.dispatcher.stream_count == 2, message="both streams"
        )
        base_traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        dropped_before = service.dispatcher.dropped_clients
        with caplog.at_level(logging.WARNING, logger="ssepg.hub"):
            first, last = await publish_all(topic, count)
            await wait_until(
                lambda: reader.count >= count or reader.closed,
                timeout=60,
                message="all events at the healthy reader",
            )
        peak_traced = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    peak_rss = peak.stop()

    assert not reader.closed
    assert reader.errors == []
    assert (reader.count, reader.first_id, reader.last_id) == (count, first, last)
    stats = service.dispatcher.stats()["totals"]
    assert service.dispatcher.dropped_clients == dropped_before + 1
    assert stats["streams"] == 1
    topic_stats = next(t for t in service.health()["topics"] if t["topic"] == topic)
    assert topic_stats["dropped_clients"] == 1
    drops = [r for r in caplog.records if "dropped subscriber" in r.getMessage()]
    assert len(drops) == 1
    assert "slow consumer" in drops[0].getMessage()

    # Growth bound: the frozen client's buffer plus the topic's window
    # (ring_capacity events of 4 KiB), plus 1 MiB for what is in flight at
    # any moment (a fan-out chunk, publish futures, parse buffers). RSS gets
    # a looser allowance for the allocator and libpq, and would still catch
    # the 20 MB the run publishes if anything kept it.
    window = topic_stats["memory_usage_bytes"]
    assert window >= ring_capacity * size
    bound = client_buffer + window
    assert peak_traced - base_traced <= bound + (1 << 20), (
        peak_traced - base_traced,
        bound,
    )
    assert peak_rss - base_rss <= bound + (8 << 20), (peak_rss - base_rss, bound)

    # The frozen socket was closed by the server: draining it ends in EOF.
    frozen.setblocking(True)
    frozen.settimeout(20)
    while frozen.recv(1 << 20):
        pass
    frozen.close()
    reader.close()
    await loop.run_in_executor(None, lambda: None)


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=60)
async def test_idle_publish_connection_killed_stops_watching_its_socket(
    services, pg_dsn
):
    # A publish connection whose backend is terminated while idle stays
    # readable at its end; it must stop watching its socket at once instead
    # of running its callback until the next publish replaces it.
    running = await services.start(dsn=pg_dsn)
    service = running.service
    topic = unique_topic()
    await service.publish(topic, "opens a publish connection")
    publisher = service.broker._publisher
    pc = publisher._conns[0]
    assert pc is not None and pc.is_usable
    calls = 0
    watched = pc._on_readable

    def counting() -> None:
        nonlocal calls
        calls += 1
        watched()

    # The loop holds the bound method it was given: re-register the counter.
    loop = asyncio.get_running_loop()
    loop.remove_reader(pc._fd)
    loop.add_reader(pc._fd, counting)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pc.conn.pgconn.backend_pid,))
    await wait_until(lambda: pc.is_broken, message="the connection noticed")
    seen = calls
    reader = await subscribe(running, topic)
    for n in range(20):
        await service.publish(topic, n)
    await reader.wait_events(20)
    assert calls == seen
    assert publisher._conns[0] is not pc
    reader.close()


# Duplicates, refusals, clients leaving a publish -------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_notification_sent_twice_reaches_subscribers_once(services, pg_dsn):
    # What a publish retried after a lost answer looks like on the wire: the
    # same envelope committed twice. Every instance delivers it once.
    a = await services.start(dsn=pg_dsn)
    b = await services.start(dsn=pg_dsn)
    topic = unique_topic()
    clients = [await subscribe(a, topic), await subscribe(b, topic)]
    event_id = "retried-1"
    envelope = json.dumps({"topic": topic, "data": "once", "id": event_id})
    channel = broker_module.channel_for(topic, a.service.config.notify_shards)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for _ in range(2):
            conn.execute("SELECT pg_notify(%s, %s)", (channel, envelope))
    after = await publish(a, topic, "after")
    for client in clients:
        events = await client.wait_events(2)
        assert [(e.id, e.json) for e in events] == [
            (event_id, "once"),
            (after["id"], "after"),
        ]
        client.close()
    for running in (a, b):
        code, report = await health(running)
        assert report["totals"]["duplicates"] == 1


@pytest.mark.gen_test(timeout=60)
async def test_a_batch_with_a_lone_surrogate_goes_out_in_one_statement(
    services, pg_dsn
):
    # JSON allows a lone "\ud800" escape, which Postgres' json operators
    # refuse: a batch carrying one must not be refused as a whole (and sent
    # again event by event).
    running = await services.start(dsn=pg_dsn)
    publisher = running.service.broker._publisher
    topic = unique_topic()
    client = await subscribe(running, topic)
    before = publisher.batches
    items = [{"topic": topic, "data": "SURROGATE"}, {"topic": topic, "data": 2}]
    body = json.dumps({"events": items}).replace("SURROGATE", "\\ud800")
    response = await http("POST", running.url("/topics"), body.encode())
    assert response.code == 200, response.body
    results = json.loads(response.body)["results"]
    assert all("id" in r for r in results), results
    events = await client.wait_events(2)
    assert [e.data for e in events] == ['"\\ud800"', "2"]
    assert publisher.batches == before + 1
    client.close()


@pytest.mark.gen_test(timeout=60)
async def test_events_sent_one_by_one_after_a_refusal_record_their_own_latency(
    services, pg_dsn, monkeypatch
):
    # When Postgres refuses a batch statement, its events are sent again one
    # by one; each publish's latency still counts from its own start.
    running = await services.start(dsn=pg_dsn)
    service = running.service
    run = publisher_module._PublishConnection.run

    async def refusing(self: Any, name: bytes, *args: Any) -> None:
        if name == self.MANY:
            raise publisher_module._StatementRefused("refused for the test")
        await run(self, name, *args)

    monkeypatch.setattr(publisher_module._PublishConnection, "run", refusing)
    topic = unique_topic()
    response = await http(
        "POST",
        running.url("/topics"),
        {"events": [{"topic": topic, "data": n} for n in range(3)]},
    )
    assert response.code == 200, response.body
    histogram = service.metrics.publish_latency()
    samples = {s.name: s.value for s in histogram.samples if not s.labels}
    assert samples["ssepg_publish_latency_seconds_count"] == 3
    assert samples["ssepg_publish_latency_seconds_sum"] < 3 * DEADLINE_S


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=60)
async def test_the_first_reconnect_succeeds_when_every_connection_was_cut(
    services, pg_dsn
):
    # As after a Postgres restart: the idle connection that sends the
    # listener's round-trip NOTIFY died too, which shows only when it is
    # used; it is replaced there and then, so the first reconnect succeeds.
    running = await services.start(dsn=pg_dsn, queue_poll_interval=3600.0)
    broker = running.service.broker
    monitor = broker.monitor._conn
    assert monitor is not None and not monitor.closed
    attempts = broker.reconnect_attempts
    old = broker.listener_pid
    for pid in (old, monitor.pgconn.backend_pid):
        terminate_backend(pg_dsn, pid)
    await wait_until(
        lambda: broker.is_connected and broker.listener_pid != old,
        message="listener back",
    )
    assert broker.reconnect_attempts == attempts + 1
    assert broker.listen_error is None


def gate_publishes(
    service: Any, loop: asyncio.AbstractEventLoop, *, send: bool
) -> tuple[asyncio.Future[None], asyncio.Event]:
    """Keep publishes of *service* waiting for the returned gate: before
    they are sent to Postgres if *send*, else only their confirmation. The
    event is set once a gated publish is over."""
    gate: asyncio.Future[None] = loop.create_future()
    over = asyncio.Event()
    submit = service.broker.submit

    def gated(*args: Any) -> asyncio.Future[None]:
        confirmed = None if send else submit(*args)
        out: asyncio.Future[None] = loop.create_future()

        async def later() -> None:
            await gate
            try:
                await (submit(*args) if confirmed is None else confirmed)
            except Exception as exc:
                out.set_exception(exc)
            else:
                out.set_result(None)
            over.set()

        asyncio.ensure_future(later())
        return out

    service.broker.submit = gated
    return gate, over


@pytest.mark.parametrize("http_server", ["front", "tornado"])
@pytest.mark.gen_test(timeout=60)
async def test_a_publish_whose_client_left_holds_until_it_is_over(
    services, pg_dsn, http_server, monkeypatch
):
    # The client leaves while its publish waits for Postgres: the publish
    # goes on, and so does its hold on the fan-outs, as for a client that
    # stays; then every count comes back to rest. (Released at the close,
    # the hold would let fan-outs go before the event they wait for.)
    from ssepg.handlers import TopicEventsHandler

    running = await services.start(dsn=pg_dsn)
    service = running.service
    dispatcher = service.dispatcher
    loop = asyncio.get_running_loop()
    gate, _ = gate_publishes(service, loop, send=True)
    closed = asyncio.Event()
    close = TopicEventsHandler.on_connection_close

    def noting(self: Any) -> None:
        close(self)
        closed.set()

    monkeypatch.setattr(TopicEventsHandler, "on_connection_close", noting)
    server = service.listen(0, "127.0.0.1", tornado_server=http_server == "tornado")
    topic = unique_topic()
    client = await subscribe(running, topic)
    sock = await raw_connect(bound_port(server))
    body = b'{"data":"left"}'
    try:
        await loop.sock_sendall(
            sock,
            (
                f"POST /topics/{topic}/events HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body,
        )
        # Read and held, not yet sent to Postgres.
        await wait_until(lambda: len(dispatcher._expected) == 1, message="held")
        sock.close()
        if http_server == "tornado":
            await asyncio.wait_for(closed.wait(), DEADLINE_S)
        else:
            await wait_until(lambda: not server._connections, message="client gone")
        assert (dispatcher._holds, dispatcher._heard_early) == (1, 0)
    finally:
        gate.set_result(None)
    assert [e.json for e in await client.wait_events(1)] == ["left"]
    await wait_until(
        lambda: (
            (dispatcher._holds, dispatcher._heard_early, dispatcher._expected)
            == (0, 0, {})
        ),
        message="counts at rest",
    )
    client.close()


@pytest.mark.parametrize("http_server", ["front", "tornado"])
@pytest.mark.gen_test(timeout=60)
async def test_a_publish_is_answered_once_its_event_is_heard_back(
    services, pg_dsn, http_server
):
    # Hearing its own event back proves Postgres committed it: the publish
    # is answered then, without waiting for the confirmation, and the
    # confirmation arriving later changes nothing.
    running = await services.start(dsn=pg_dsn)
    service = running.service
    dispatcher = service.dispatcher
    loop = asyncio.get_running_loop()
    gate, over = gate_publishes(service, loop, send=False)
    server = service.listen(0, "127.0.0.1", tornado_server=http_server == "tornado")
    url = f"http://127.0.0.1:{bound_port(server)}"
    topic = unique_topic()
    client = await subscribe(running, topic)
    try:
        response = await http("POST", f"{url}/topics/{topic}/events", {"data": "early"})
        assert response.code == 200, response.body
        assert not gate.done() and not over.is_set()
        answer = json.loads(response.body)
        assert [(e.id, e.json) for e in await client.wait_events(1)] == [
            (answer["id"], "early")
        ]
        await wait_until(
            lambda: (
                (dispatcher._holds, dispatcher._heard_early, dispatcher._expected)
                == (0, 0, {})
            ),
            message="counts at rest",
        )
    finally:
        gate.set_result(None)
    await asyncio.wait_for(over.wait(), DEADLINE_S)
    assert (dispatcher._holds, dispatcher._heard_early, dispatcher._expected) == (
        0,
        0,
        {},
    )
    assert service.health()["totals"]["published"] >= 1
    client.close()


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=60)
async def test_a_publish_heard_back_is_not_sent_again_after_its_connection_fails(
    services, pg_dsn, monkeypatch
):
    # The connection fails after Postgres committed a publish and before its
    # confirmation arrived, but the event was heard back (and answered)
    # meanwhile: the retry must not send it again, since a second copy
    # reaches subscribers once the first has left the replay window.
    running = await services.start(dsn=pg_dsn)
    service = running.service
    publisher = service.broker._publisher
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[None] = loop.create_future()
    sent: list[bytes] = []
    run = publisher_module._PublishConnection.run

    async def lost_after_commit(self: Any, name: bytes, params: Any, *rest: Any):
        sent.append(params[-1])
        await run(self, name, params, *rest)
        if len(sent) == 1:
            await answered
            raise OSError("connection lost for the test")

    monkeypatch.setattr(publisher_module._PublishConnection, "run", lost_after_commit)
    topic = unique_topic()
    client = await subscribe(running, topic)
    try:
        answer = await publish(running, topic, "once")
    finally:
        answered.set_result(None)
    await wait_until(
        lambda: not any(publisher._busy), message="the publish connection's work over"
    )
    after = await publish(running, topic, "after")
    assert [(e.id, e.json) for e in await client.wait_events(2)] == [
        (answer["id"], "once"),
        (after["id"], "after"),
    ]
    assert len(sent) == 2  # "once" a single time, then "after"
    totals = service.health()["totals"]
    assert (totals["published"], totals["duplicates"]) == (2, 0)
    assert not publisher._heard
    client.close()
