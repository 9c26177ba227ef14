"""Brokers: how events travel between instances.

`MemoryBroker` hands events straight to the local dispatcher (one instance,
the embedded default). `PostgresBroker` sends them through Postgres
LISTEN/NOTIFY so that every instance on the database hears every event in the
same order. It keeps three connections, none shared between tasks:

- the listener: LISTEN on ``topic_broadcast_0..N-1`` and a private channel,
  read directly from libpq on the IOLoop, probed for liveness;
- the publisher (`ssepg.publisher`): NOTIFYs, batched so that concurrent
  publishes share one round trip;
- the monitor: polls ``pg_notification_queue_usage()`` and sends the
  round-trip test NOTIFY, so that neither ever waits behind a publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import psycopg

from ._fast import JSONError, fnv1a_32, parse_envelope
from .errors import BrokerError
from .hub import Dispatcher
from .log import RateLimitedLog, broker_log
from .pgconn import (
    STATEMENT_TIMEOUT_S,
    _backoff,
    _bounded,
    _close_quietly,
    _connect,
    _describe,
    _kill_socket,
)
from .publisher import Publisher

__all__ = [
    "Broker",
    "MemoryBroker",
    "PostgresBroker",
    "build_envelope",
    "parse_envelope",
    "channel_for",
]

CHANNEL_PREFIX = "topic_broadcast_"
# The listener NOTIFYs itself this often; silence for PROBE_TIMEOUT_S after a
# probe means the path is dead even if TCP says nothing. Together they bound
# detection of a silently dead connection to 10 s.
PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 5.0
# At start and after every reconnect the listener must hear a NOTIFY sent from
# another session within this time (section 4 of the design).
ROUND_TRIP_TIMEOUT_S = 2.0


def channel_for(topic: str, shards: int) -> str:
    """The Postgres channel of *topic*: FNV-1a 32-bit of its UTF-8 bytes,
    modulo the number of notify shards."""
    return CHANNEL_PREFIX + str(fnv1a_32(topic) % shards)


def build_envelope(topic: str, event_id: str, event: str, data: bytes) -> bytes:
    """The NOTIFY payload: ``{"topic":..,"data":..,"id":..}`` plus
    ``"event"`` when it is not ``message``. Topic, id and event need no
    escaping: their characters are restricted."""
    tail = (
        b'"}' if event == "message" else b'","event":"' + event.encode("ascii") + b'"}'
    )
    return (
        b'{"topic":"'
        + topic.encode("ascii")
        + b'","data":'
        + data
        + b',"id":"'
        + event_id.encode("ascii")
        + tail
    )


class Broker:
    """What a `ssepg.Service` needs from a broker."""

    kind = "none"

    def __init__(self) -> None:
        self.reconnect_attempts = 0
        self.last_notification_at: float | None = None
        self.queue_usage: float | None = None
        self.listen_error: str | None = None
        self.bad_envelopes = 0

    @property
    def is_connected(self) -> bool:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    def submit(
        self, topic: str, event_id: str, event: str, data: bytes, envelope: bytes
    ) -> asyncio.Future[None] | None:
        """Send one event. Returns None when the broker took it at once, else
        a future that resolves once it did, or fails with `BrokerError`
        when not taken within the publish timeout.

        :raises BrokerError: the broker is closed.
        """
        raise NotImplementedError

    def submit_many(
        self, events: list[tuple[str, str, str, bytes, bytes]]
    ) -> asyncio.Future[list[BaseException | None]] | None:
        """Send several events ``(topic, id, event, data, envelope)``. Returns
        None when the broker took them all at once, else a future of each
        one's outcome (None, or its exception), in order.

        :raises BrokerError: the broker is closed.
        """
        for event in events:
            if self.submit(*event) is not None:
                raise NotImplementedError("an asynchronous broker needs its own")
        return None

    def heard_back(self, confirmed: asyncio.Future[None]) -> None:
        """The event whose `submit` returned *confirmed* was heard back, so
        the broker has taken it, whatever becomes of the confirmation. An
        asynchronous broker must then never send it again."""

    async def publish(
        self, topic: str, event_id: str, event: str, data: bytes, envelope: bytes
    ) -> None:
        """Send one event; returns once the broker has taken it.

        :raises BrokerError: not taken within the publish timeout.
        """
        confirmed = self.submit(topic, event_id, event, data, envelope)
        if confirmed is not None:
            await confirmed

    async def close(self) -> None:
        raise NotImplementedError


class MemoryBroker(Broker):
    """The embedded default: events go straight to this process's dispatcher."""

    kind = "memory"

    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__()
        self._dispatcher = dispatcher
        self._closed = False

    @property
    def is_connected(self) -> bool:
        return not self._closed

    async def start(self) -> None:
        pass

    def submit(
        self, topic: str, event_id: str, event: str, data: bytes, envelope: bytes
    ) -> None:
        if self._closed:
            raise BrokerError("broker is closed")
        self._dispatcher.ingest(topic, event_id, event, data)
        self.last_notification_at = time.time()

    async def close(self) -> None:
        self._closed = True


class _Monitor:
    """A connection that neither publishes nor listens: polls the
    notification queue usage and sends the listener's round-trip NOTIFY."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def _execute(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        async with self._lock:
            while True:
                is_new = self._conn is None or self._conn.closed
                if is_new:
                    self._conn = await _connect(self._dsn)
                conn = self._conn
                assert conn is not None
                try:
                    cur = await _bounded(
                        conn, conn.execute(query, params), STATEMENT_TIMEOUT_S
                    )
                    return await cur.fetchone()
                except (psycopg.OperationalError, TimeoutError) as exc:
                    self._conn = None
                    await _close_quietly(conn)
                    # A connection that died while idle (Postgres restarted,
                    # its backend terminated) is only found out now: once
                    # more on a new one. A timeout means the path itself.
                    if is_new or isinstance(exc, TimeoutError):
                        raise

    async def notify(self, channel: str, payload: str) -> None:
        await self._execute("SELECT pg_notify(%s, %s)", (channel, payload))

    async def queue_usage(self) -> float:
        row = await self._execute("SELECT pg_notification_queue_usage()")
        return float(row[0])

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        await _close_quietly(conn)


class _Listener:
    """The LISTEN connection. After LISTEN, libpq is read directly from an
    IOLoop reader callback: psycopg's ``notifies()`` would hold the
    connection's lock for as long as it waits."""

    def __init__(self, broker: PostgresBroker) -> None:
        self._broker = broker
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._fd = -1
        self._loop = asyncio.get_running_loop()
        self._lost: asyncio.Future[str] | None = None
        self._probe_handle: asyncio.TimerHandle | None = None
        self._probe_deadline: asyncio.TimerHandle | None = None
        self._probe_token = ""
        self._probe_busy = False
        self._round_trip: asyncio.Future[None] | None = None
        self._round_trip_token = ""
        self._held: list[tuple[bytes, bytes]] | None = None
        self.is_connected = False
        self.has_connected = False
        self.is_path_silent = False
        self.pid: int | None = None

    async def run(self) -> None:
        broker = self._broker
        attempt = 0
        while not broker.is_closing:
            reason = "closing"
            try:
                await self._open()
                attempt = 0
                assert self._lost is not None
                reason = await self._lost
            except asyncio.CancelledError:
                await self._teardown()
                raise
            except (psycopg.Error, OSError, TimeoutError, _RoundTripError) as exc:
                reason = _describe(exc)
                if isinstance(exc, _RoundTripError):
                    broker.listen_error = reason
                    broker_log.error("%s", reason)
            await self._teardown()
            if broker.is_closing:
                break
            if self.is_path_silent:
                # A path that went silent for the listener has most likely
                # gone silent for the other connections to the server too.
                self.is_path_silent = False
                await broker.drop_suspect_connections()
            attempt += 1
            broker.reconnect_attempts += 1
            delay = _backoff(attempt)
            broker_log.warning(
                "listener down (%s); reconnect attempt %d in %.1f s",
                reason,
                broker.reconnect_attempts,
                delay,
            )
            await broker.sleep(delay)

    async def _open(self) -> None:
        broker = self._broker
        conn = self._conn = await _connect(broker.dsn)
        for name in broker.channels + [broker.private_channel]:
            # Channel names are generated from a fixed pattern, never input.
            await _bounded(conn, conn.execute(f"LISTEN {name}"), STATEMENT_TIMEOUT_S)
        pg = conn.pgconn
        self.pid = pg.backend_pid
        self._fd = pg.socket
        self._lost = self._loop.create_future()
        self._held = []
        self._loop.add_reader(self._fd, self._on_readable)
        await self._prove_round_trip()
        broker.listen_error = None
        if self.has_connected:
            broker.dispatcher.mark_gap()
            broker_log.info(
                "LISTEN re-established on %d channels", len(broker.channels)
            )
        else:
            broker_log.info("LISTEN established on %d channels", len(broker.channels))
        held, self._held = self._held, None
        for relname, extra in held:
            self._on_notify(relname, extra)
        self.has_connected = True
        self.is_connected = True
        broker.on_listener_change(True)
        self._probe_handle = self._loop.call_later(PROBE_INTERVAL_S, self._probe)

    async def _prove_round_trip(self) -> None:
        self._round_trip = self._loop.create_future()
        self._round_trip_token = "rt-" + os.urandom(6).hex()
        try:
            await self._broker.monitor.notify(
                self._broker.private_channel, self._round_trip_token
            )
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise _RoundTripError(
                f"round-trip test could not send its NOTIFY: {_describe(exc)}"
            ) from exc
        try:
            await asyncio.wait_for(
                asyncio.shield(self._round_trip), ROUND_TRIP_TIMEOUT_S
            )
        except asyncio.TimeoutError:
            raise _RoundTripError(
                "LISTEN did not hear a NOTIFY sent from another session within "
                f"{ROUND_TRIP_TIMEOUT_S:g} s: is a connection pooler in transaction "
                "mode between ssepg and Postgres, or do LISTEN and NOTIFY reach "
                "different databases?"
            ) from None
        finally:
            self._round_trip = None

    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        pg = conn.pgconn
        try:
            pg.consume_input()
            if self._probe_busy:
                while not pg.is_busy():
                    if pg.get_result() is None:
                        self._probe_busy = False
                        break
            while True:
                n = pg.notifies()
                if n is None:
                    break
                if (
                    self._held is not None
                    and n.relname != self._broker.private_channel_bytes
                ):
                    # Until the round trip is proven and the gap announced,
                    # events wait so that they land after the gap frame.
                    self._held.append((n.relname, n.extra))
                else:
                    self._on_notify(n.relname, n.extra)
            self._broker.dispatcher.fan_out_now()
        except psycopg.Error as exc:
            self._lose(f"connection lost: {_describe(exc)}")

    def _on_notify(self, relname: bytes, extra: bytes) -> None:
        broker = self._broker
        if relname == broker.private_channel_bytes:
            token = extra.decode("ascii", "replace")
            if token == self._probe_token:
                self._probe_token = ""
                if self._probe_deadline is not None:
                    self._probe_deadline.cancel()
                    self._probe_deadline = None
            elif (
                token == self._round_trip_token
                and self._round_trip is not None
                and not self._round_trip.done()
            ):
                self._round_trip.set_result(None)
            return
        try:
            topic, event_id, event, data = parse_envelope(extra)
        except (ValueError, UnicodeDecodeError) as exc:
            broker.bad_envelopes += 1
            broker.bad_envelope_log.log(
                "skipped a bad envelope on %s: %s", relname, exc
            )
            return
        broker.dispatcher.ingest(topic, event_id, event, data)
        broker.last_notification_at = time.time()

    def _probe(self) -> None:
        self._probe_handle = None
        conn = self._conn
        if conn is None or not self.is_connected:
            return
        pg = conn.pgconn
        self._probe_token = "probe-" + os.urandom(6).hex()
        try:
            if not self._probe_busy:
                query = f"NOTIFY {self._broker.private_channel}, '{self._probe_token}'"
                pg.send_query(query.encode("ascii"))
                self._probe_busy = True
            pg.flush()
        except psycopg.Error as exc:
            self._lose(f"liveness probe failed: {_describe(exc)}")
            return
        self._probe_deadline = self._loop.call_later(
            PROBE_TIMEOUT_S, self._probe_expired
        )
        self._probe_handle = self._loop.call_later(
            PROBE_INTERVAL_S + PROBE_TIMEOUT_S, self._probe
        )

    def _probe_expired(self) -> None:
        self._probe_deadline = None
        self.is_path_silent = True
        self._lose(f"no answer to the liveness probe within {PROBE_TIMEOUT_S:g} s")

    def _lose(self, reason: str) -> None:
        if self.is_connected:
            self.is_connected = False
            self._broker.on_listener_change(False)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(reason)

    async def _teardown(self) -> None:
        was_connected = self.is_connected
        self.is_connected = False
        if was_connected:
            self._broker.on_listener_change(False)
        for handle in (self._probe_handle, self._probe_deadline):
            if handle is not None:
                handle.cancel()
        self._probe_handle = self._probe_deadline = None
        self._probe_busy = False
        self._held = None
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        conn, self._conn = self._conn, None
        if conn is not None:
            _kill_socket(conn)
            await _close_quietly(conn)
        self.pid = None

    def stop(self) -> None:
        self._lose("closing")


class _RoundTripError(Exception):
    pass


class PostgresBroker(Broker):
    """Events through Postgres LISTEN/NOTIFY (psycopg 3, async).

    Belongs to the IOLoop it was started on; `close` releases its tasks and
    connections. Starting never fails because Postgres is down: the listener
    keeps retrying with capped backoff while health reports ``degraded``.
    """

    kind = "postgres"

    def __init__(
        self,
        config: Any,
        dispatcher: Dispatcher,
        on_listener_change: Callable[[bool], None] | None = None,
        on_published: Callable[[str, float], None] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.dsn: str = config.dsn
        self.dispatcher = dispatcher
        self.channels = [CHANNEL_PREFIX + str(i) for i in range(config.notify_shards)]
        self.private_channel = "ssepg_probe_" + dispatcher.instance_id
        self.private_channel_bytes = self.private_channel.encode("ascii")
        self.is_closing = False
        self.monitor = _Monitor(self.dsn)
        self.bad_envelope_log = RateLimitedLog(broker_log, 30)
        self._listener: _Listener | None = None
        self._publisher: Publisher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: asyncio.Event | None = None
        self._on_change = on_listener_change
        # Told of every event Postgres took, with its topic and how long it
        # waited: the service counts and times publishes with it.
        self.on_published = on_published
        self._queue_warned = False

    @property
    def is_connected(self) -> bool:
        return self._listener is not None and self._listener.is_connected

    @property
    def listener_pid(self) -> int | None:
        """The Postgres backend pid of the LISTEN connection, when connected."""
        return self._listener.pid if self._listener is not None else None

    @property
    def publish_connected(self) -> bool:
        return self._publisher is not None and self._publisher.is_connected

    def on_listener_change(self, is_up: bool) -> None:
        if self._on_change is not None:
            self._on_change(is_up)

    async def drop_suspect_connections(self) -> None:
        """Replace the publish and monitor connections after the listener
        found its path to Postgres silently dead; each reconnects on next
        use."""
        if self._publisher is not None:
            self._publisher.drop_connections()
        await self.monitor.close()

    async def sleep(self, delay: float) -> None:
        """Sleep that `close` cuts short."""
        assert self._wake is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._listener = _Listener(self)
        self._publisher = Publisher(self)
        self._tasks = [
            asyncio.ensure_future(self._listener.run()),
            asyncio.ensure_future(self._poll_queue()),
        ]

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until the listener is up; False after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while not self.is_connected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.is_connected

    def submit(
        self, topic: str, event_id: str, event: str, data: bytes, envelope: bytes
    ) -> asyncio.Future[None]:
        if self.is_closing or self._publisher is None:
            raise BrokerError("broker is closing")
        channel = channel_for(topic, self.config.notify_shards)
        return self._publisher.submit(
            channel, envelope, self.config.publish_timeout, topic
        )

    def heard_back(self, confirmed: asyncio.Future[None]) -> None:
        if self._publisher is not None:
            self._publisher.heard_back(confirmed)

    def submit_many(
        self, events: list[tuple[str, str, str, bytes, bytes]]
    ) -> asyncio.Future[list[BaseException | None]]:
        if self.is_closing or self._publisher is None:
            raise BrokerError("broker is closing")
        shards = self.config.notify_shards
        return self._publisher.submit_many(
            [
                (channel_for(topic, shards), envelope, topic)
                for topic, _, _, _, envelope in events
            ],
            self.config.publish_timeout,
        )

    async def _poll_queue(self) -> None:
        interval = self.config.queue_poll_interval
        threshold = self.config.queue_warn_threshold
        while not self.is_closing:
            try:
                usage = await self.monitor.queue_usage()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                broker_log.debug("queue usage poll failed: %s", exc)
            else:
                self.queue_usage = usage
                if usage > threshold and not self._queue_warned:
                    self._queue_warned = True
                    broker_log.warning(
                        "Postgres notification queue is %.1f%% full (warning above "
                        "%.1f%%): a session is not consuming its notifications",
                        usage * 100,
                        threshold * 100,
                    )
                elif usage <= threshold and self._queue_warned:
                    self._queue_warned = False
                    broker_log.info(
                        "Postgres notification queue back to %.1f%% full", usage * 100
                    )
            await self.sleep(interval)

    async def close(self) -> None:
        if self.is_closing:
            return
        self.is_closing = True
        if self._wake is not None:
            self._wake.set()
        if self._listener is not None:
            self._listener.stop()
        if self._publisher is not None:
            await self._publisher.close()
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, 10.0)
            except (Exception, asyncio.CancelledError, asyncio.TimeoutError):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        await self.monitor.close()
        self.bad_envelope_log.report()


def validate_envelope_size(envelope: bytes, limit: int) -> None:
    """Raise `PayloadTooLarge` when *envelope* exceeds *limit* UTF-8 bytes."""
    from .errors import PayloadTooLarge

    if len(envelope) > limit:
        raise PayloadTooLarge("event too large", len(envelope), limit)


__all__ += ["validate_envelope_size", "JSONError"]
