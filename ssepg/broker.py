"""Brokers: how events travel between instances.

`MemoryBroker` hands events straight to the local dispatcher (one instance,
the embedded default). `PostgresBroker` sends them through Postgres
LISTEN/NOTIFY so that every instance on the database hears every event in the
same order. It keeps three connections, none shared between tasks:

- the listener: LISTEN on ``topic_broadcast_0..N-1`` and a private channel,
  read directly from libpq on the IOLoop, probed for liveness;
- the publisher: NOTIFYs, batched so that concurrent publishes share one
  round trip;
- the monitor: polls ``pg_notification_queue_usage()`` and sends the
  round-trip test NOTIFY, so that neither ever waits behind a publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import psycopg

from ._fast import JSONError, fnv1a_32, parse_envelope
from .errors import BrokerError, PublishError
from .hub import Dispatcher
from .log import RateLimitedLog, broker_log

__all__ = [
    "Broker",
    "MemoryBroker",
    "PostgresBroker",
    "build_envelope",
    "parse_envelope",
    "channel_for",
]

T = TypeVar("T")

CHANNEL_PREFIX = "topic_broadcast_"
CONNECT_TIMEOUT_S = 5.0
STATEMENT_TIMEOUT_S = 5.0
# The listener NOTIFYs itself this often; silence for PROBE_TIMEOUT_S after a
# probe means the path is dead even if TCP says nothing. Together they bound
# detection of a silently dead connection to 10 s.
PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 5.0
# At start and after every reconnect the listener must hear a NOTIFY sent from
# another session within this time (section 4 of the design).
ROUND_TRIP_TIMEOUT_S = 2.0
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 10.0
# A batch of NOTIFYs is one statement; these keep it a reasonable size.
MAX_BATCH_EVENTS = 2000
MAX_BATCH_BYTES = 4 << 20
PUBLISH_CONNECTIONS = 2
# A further publish connection joins only when this many events wait: with
# few publishes in flight, one connection carries all that came during its
# last round trip in one statement, where two would alternate small ones
# (each statement costs a round trip of system calls on both sides).
EXTRA_CONNECTION_BACKLOG = 256


class _Waiter(Protocol):
    """What a queued event tells when it settles: an `asyncio.Future`, or
    a `_Share` of events published together."""

    def done(self) -> bool: ...
    def set_result(self, result: None) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


class _Group:
    """Events published together (one batch request) settle one future, with
    the outcome of each (None, or its exception), instead of one each."""

    __slots__ = ("future", "outcomes", "remaining")

    def __init__(self, future: asyncio.Future[list[BaseException | None]], size: int):
        self.future = future
        self.outcomes: list[BaseException | None] = [None] * size
        self.remaining = size

    def settle(self, index: int, outcome: BaseException | None) -> None:
        self.outcomes[index] = outcome
        self.remaining -= 1
        if not self.remaining and not self.future.done():
            self.future.set_result(self.outcomes)


class _Share:
    """One event's part in a `_Group`."""

    __slots__ = ("group", "index", "is_done")

    def __init__(self, group: _Group, index: int) -> None:
        self.group = group
        self.index = index
        self.is_done = False

    def done(self) -> bool:
        return self.is_done

    def set_result(self, result: None) -> None:
        self.is_done = True
        self.group.settle(self.index, None)

    def set_exception(self, exception: BaseException) -> None:
        self.is_done = True
        self.group.settle(self.index, exception)


# channel, envelope, who waits for it, its deadline on the loop clock, the
# topic (for the counts once Postgres took it)
_Item = tuple[str, bytes, _Waiter, float, str]


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


def _kill_socket(conn: psycopg.AsyncConnection[Any] | None) -> None:
    # Shut the connection's socket down without closing its descriptor: any
    # coroutine psycopg has waiting on it wakes up with an error at once,
    # while the descriptor stays valid for the event loop until psycopg
    # closes it.
    if conn is None or conn.closed:
        return
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:
        return
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


async def _bounded(
    conn: psycopg.AsyncConnection[Any] | None, work: Awaitable[T], timeout: float
) -> T:
    """Await *work* for at most *timeout* seconds. On timeout the connection
    is shut down (never cancelled: psycopg would try to send a cancel request
    over a path that may be dead) and `TimeoutError` raised."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        _kill_socket(conn)
        with contextlib.suppress(BaseException):
            await task
        raise
    if task in done:
        return task.result()
    _kill_socket(conn)
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(task, 5.0)
    raise TimeoutError(f"no answer from Postgres within {timeout:g} s")


async def _connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    work = psycopg.AsyncConnection.connect(
        dsn,
        autocommit=True,
        connect_timeout=int(CONNECT_TIMEOUT_S),
        application_name="ssepg",
    )
    return await _bounded(None, work, CONNECT_TIMEOUT_S + 1.0)


async def _close_quietly(conn: psycopg.AsyncConnection[Any] | None) -> None:
    if conn is None or conn.closed:
        return
    try:
        await asyncio.wait_for(conn.close(), 5.0)
    except (Exception, asyncio.TimeoutError):
        _kill_socket(conn)


def _describe(exc: BaseException) -> str:
    # libpq messages run over several lines; a log line takes the first.
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _backoff(attempt: int) -> float:
    delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** min(attempt, 16))
    return delay * random.uniform(0.8, 1.2)


class _Monitor:
    """A connection that neither publishes nor listens: polls the
    notification queue usage and sends the listener's round-trip NOTIFY."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def _execute(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        async with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = await _connect(self._dsn)
            conn = self._conn
            try:
                cur = await _bounded(
                    conn, conn.execute(query, params), STATEMENT_TIMEOUT_S
                )
                return await cur.fetchone()
            except (psycopg.OperationalError, TimeoutError):
                self._conn = None
                await _close_quietly(conn)
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


def _batch_json(batch: list[_Item]) -> bytes:
    # A batch travels as one json parameter, [[channel, envelope], ...]:
    # Postgres' json type keeps each element's text byte for byte, and
    # building it is one bytes join here, where a text[] parameter would be
    # escaped item by item. Channel names are ASCII from a fixed pattern and
    # envelopes are valid JSON, so the array needs no escaping.
    parts = [b'["' + c.encode("ascii") + b'",' + p + b"]" for c, p, _, _, _ in batch]
    return b"[" + b",".join(parts) + b"]"


class _StatementRefused(Exception):
    """Postgres refused a statement for what it holds (the connection is
    fine)."""


class _PublishConnection:
    """A publish connection driven through libpq directly.

    Its two statements are prepared once; a batch is then one
    ``send_query_prepared`` whose result a reader callback collects, with
    none of psycopg's per-statement machinery (cursor, query conversion,
    wait generator, task steps), which cost more than the rest of the
    publish path. One statement is in flight at a time. Belongs to the
    IOLoop it was opened on.
    """

    ONE = b"ssepg_notify_one"
    MANY = b"ssepg_notify_many"

    def __init__(
        self, conn: psycopg.AsyncConnection[Any], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.conn = conn
        self._pg = conn.pgconn
        self._fd = self._pg.socket
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self._error: str | None = None
        self._writing = False
        self.is_broken = False
        loop.add_reader(self._fd, self._on_readable)

    @classmethod
    async def open(
        cls, dsn: str, loop: asyncio.AbstractEventLoop
    ) -> _PublishConnection:
        conn = await _connect(dsn)
        try:
            for statement in (
                "PREPARE ssepg_notify_one(text, text) AS SELECT pg_notify($1, $2)",
                "PREPARE ssepg_notify_many(json) AS SELECT count(pg_notify(e->>0, "
                "(e->1)::text)) FROM json_array_elements($1) AS e",
            ):
                await _bounded(conn, conn.execute(statement), STATEMENT_TIMEOUT_S)
        except BaseException:
            await _close_quietly(conn)
            raise
        return cls(conn, loop)

    @property
    def is_usable(self) -> bool:
        return not self.is_broken and not self.conn.closed

    async def run(self, name: bytes, params: list[bytes], timeout: float) -> None:
        """Execute the prepared statement *name* with text *params*.

        :raises _StatementRefused: Postgres refused it for what it holds.
        :raises OSError: the connection failed (it is unusable from then on).
        :raises TimeoutError: no answer within *timeout* (likewise).
        """
        if self._waiter is not None:
            raise RuntimeError("a statement is already in flight")
        pg = self._pg
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, self._time_out, timeout)
        try:
            pg.send_query_prepared(name, params)
            self._flush()
            await waiter
        except psycopg.Error as exc:
            self.is_broken = True
            raise OSError(_describe(exc)) from None
        finally:
            timer.cancel()
            self._waiter = None

    def _flush(self) -> None:
        # A large batch may not fit the socket at once: libpq keeps the rest
        # and sends it when the socket can take it.
        if self._pg.flush() == 0:
            if self._writing:
                self._writing = False
                self._loop.remove_writer(self._fd)
        elif not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            self._flush()
        except psycopg.Error as exc:
            self._fail(OSError(_describe(exc)))

    def _on_readable(self) -> None:
        pg = self._pg
        try:
            pg.consume_input()
            while self._waiter is not None and not pg.is_busy():
                result = pg.get_result()
                if result is None:
                    self._settle()
                    break
                if result.status == psycopg.pq.ExecStatus.FATAL_ERROR:
                    self._error = (result.error_message or b"").decode(
                        "utf-8", "replace"
                    )
            while pg.notifies() is not None:
                pass  # nothing listens here; keep libpq's list empty
        except psycopg.Error as exc:
            self._fail(OSError(_describe(exc)))

    def _settle(self) -> None:
        waiter, error = self._waiter, self._error
        self._error = None
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(_StatementRefused(error.strip()))

    def _fail(self, exc: BaseException) -> None:
        self.is_broken = True
        # A failed socket stays readable (at its end) for good: stop watching
        # it now, or the callback would run without end until the connection
        # is replaced, which waits for the next publish.
        self._unwatch()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _unwatch(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._writing = False
                self._loop.remove_writer(self._fd)
            self._fd = -1

    def _time_out(self, timeout: float) -> None:
        # The path may be dead without a word from TCP: give the
        # connection up rather than wait for it.
        self._fail(TimeoutError(f"no answer from Postgres within {timeout:g} s"))
        _kill_socket(self.conn)

    def kill(self) -> None:
        """Shut the socket down: a statement in flight fails at once."""
        self.is_broken = True
        _kill_socket(self.conn)

    async def close(self) -> None:
        self._unwatch()
        self.is_broken = True
        await _close_quietly(self.conn)


class _Publisher:
    """Batches concurrent publishes into one statement per round trip, on up
    to `PUBLISH_CONNECTIONS` connections at once."""

    def __init__(self, broker: PostgresBroker) -> None:
        self._broker = broker
        self._pending: list[_Item] = []
        self._conns: list[_PublishConnection | None] = [None] * PUBLISH_CONNECTIONS
        # Kept: asyncio.get_running_loop() costs a getpid() call on some
        # Python versions, and this is per event.
        self._loop = asyncio.get_running_loop()
        self._busy = [False] * PUBLISH_CONNECTIONS
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: list[list[_Item] | None] = [None] * PUBLISH_CONNECTIONS
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._log = RateLimitedLog(broker_log, 30)
        self.batches = 0
        self.is_connected = False

    def submit(
        self, channel: str, payload: bytes, timeout: float, topic: str
    ) -> asyncio.Future[None]:
        loop = self._loop
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((channel, payload, fut, loop.time() + timeout, topic))
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_later(timeout, self._expire)
        self._kick()
        return fut

    def submit_many(
        self, entries: list[tuple[str, bytes, str]], timeout: float
    ) -> asyncio.Future[list[BaseException | None]]:
        """Queue ``(channel, envelope, topic)`` entries under one future."""
        loop = self._loop
        group = _Group(loop.create_future(), len(entries))
        deadline = loop.time() + timeout
        self._pending.extend(
            (channel, payload, _Share(group, index), deadline, topic)
            for index, (channel, payload, topic) in enumerate(entries)
        )
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_later(timeout, self._expire)
        self._kick()
        return group.future

    def _expire(self) -> None:
        # One timer serves every publish (no task or timer each): it fails
        # the futures past their deadline, then waits for the next deadline.
        # Queued and in-flight items are in deadline order, so only the head
        # of each list is looked at.
        self._deadline_timer = None
        loop = self._loop
        now = loop.time()
        message = (
            f"publish not confirmed within {self._broker.config.publish_timeout:g} s"
        )
        upcoming = []
        for items in [self._pending, *self._in_flight]:
            for _, _, fut, deadline, _ in items or ():
                if fut.done():
                    continue
                if deadline > now:
                    upcoming.append(deadline)
                    break
                # Still queued: it will be skipped. Already sent: it may yet
                # arrive, which the 503 cannot take back.
                fut.set_exception(BrokerError(message))
        if upcoming:
            self._deadline_timer = loop.call_later(min(upcoming) - now, self._expire)

    def _kick(self) -> None:
        for slot in range(PUBLISH_CONNECTIONS):
            if not self._pending:
                return
            if self._busy[slot]:
                continue
            if slot and len(self._pending) < EXTRA_CONNECTION_BACKLOG:
                return
            self._busy[slot] = True
            task = asyncio.ensure_future(self._run(slot))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take_batch(self) -> list[_Item]:
        batch = []
        size = 0
        pending = self._pending
        taken = 0
        # Connections at work share the backlog: each statement takes its
        # part, so that they overlap instead of one taking everything.
        # A batch request stays whole, though: split over two connections,
        # its second part could commit before its first, and its events
        # would reach subscribers out of the order they were given in.
        engaged = max(1, sum(self._busy))
        limit = min(MAX_BATCH_EVENTS, -(-len(pending) // engaged))
        full = False
        group = None
        for item in pending:
            waiter = item[2]
            if full and (type(waiter) is not _Share or waiter.group is not group):
                break
            taken += 1
            if waiter.done():
                continue
            batch.append(item)
            size += len(item[1])
            if not full and (len(batch) >= limit or size >= MAX_BATCH_BYTES):
                full = True
                group = waiter.group if type(waiter) is _Share else None
                if group is None:
                    break
        del pending[:taken]
        return batch

    async def _run(self, slot: int) -> None:
        try:
            while self._pending and not self._broker.is_closing:
                batch = self._take_batch()
                if batch:
                    await self._send(slot, batch)
        finally:
            self._busy[slot] = False
        if self._pending and not self._broker.is_closing:
            self._kick()

    async def _send(self, slot: int, batch: list[_Item]) -> None:
        self._in_flight[slot] = batch
        try:
            await self._send_batch(slot, batch)
        finally:
            self._in_flight[slot] = None

    async def _connection(self, slot: int) -> _PublishConnection:
        pc = self._conns[slot]
        if pc is None or not pc.is_usable:
            if pc is not None:
                self._conns[slot] = None
                await pc.close()
            pc = await _PublishConnection.open(self._broker.dsn, self._loop)
            self._conns[slot] = pc
            self.is_connected = True
        return pc

    async def _drop(self, slot: int) -> None:
        pc, self._conns[slot] = self._conns[slot], None
        self.is_connected = False
        if pc is not None:
            await pc.close()

    async def _send_batch(self, slot: int, batch: list[_Item]) -> None:
        broker = self._broker
        timeout = broker.config.publish_timeout
        attempts = broker.config.publish_retries + 1
        for attempt in range(attempts):
            batch = [item for item in batch if not item[2].done()]
            if not batch:
                return
            try:
                pc = await self._connection(slot)
                if len(batch) == 1:
                    channel, payload = batch[0][0], batch[0][1]
                    await pc.run(pc.ONE, [channel.encode("ascii"), payload], timeout)
                else:
                    await pc.run(pc.MANY, [_batch_json(batch)], timeout)
            except _StatementRefused:
                # Refused by Postgres for what an event holds: the connection
                # is fine, so find the culprit by sending each one alone.
                await self._send_each(slot, batch)
                return
            except (psycopg.Error, OSError, TimeoutError) as exc:
                # The connection is gone or stuck: drop it, retry on a new one.
                await self._drop(slot)
                self._log.log(
                    "publish connection failed (%s); %d attempts left",
                    _describe(exc),
                    attempts - attempt - 1,
                )
                if attempt + 1 < attempts:
                    await broker.sleep(_backoff(attempt) / 4)
                continue
            self._confirm(batch)
            return
        for _, _, fut, _, _ in batch:
            if not fut.done():
                fut.set_exception(BrokerError("Postgres is unreachable"))

    def _confirm(self, batch: list[_Item]) -> None:
        # Postgres took these: wake their publishers and count them, here in
        # one pass rather than in a callback per future.
        self.batches += 1
        report = self._broker.on_published
        timeout = self._broker.config.publish_timeout
        now = self._loop.time()
        for _, _, fut, deadline, topic in batch:
            if not fut.done():
                fut.set_result(None)
                if report is not None:
                    report(topic, now - (deadline - timeout))

    async def _send_each(self, slot: int, batch: list[_Item]) -> None:
        timeout = self._broker.config.publish_timeout
        for channel, payload, fut, _, topic in batch:
            pc = self._conns[slot]
            if fut.done():
                continue
            if pc is None or not pc.is_usable:
                fut.set_exception(BrokerError("Postgres is unreachable"))
                continue
            try:
                await pc.run(pc.ONE, [channel.encode("ascii"), payload], timeout)
            except _StatementRefused as exc:
                fut.set_exception(PublishError(f"postgres refused the event: {exc}"))
            except (psycopg.Error, OSError, TimeoutError) as exc:
                await self._drop(slot)
                fut.set_exception(BrokerError(f"publish failed: {_describe(exc)}"))
            else:
                self._confirm([(channel, payload, fut, 0.0, topic)])

    def drop_connections(self) -> None:
        """Shut every publish connection down: a statement in flight fails at
        once and is retried on a new connection instead of waiting out the
        publish timeout on a dead path; idle connections are replaced."""
        for pc in self._conns:
            if pc is not None:
                pc.kill()
        self.is_connected = False

    async def close(self) -> None:
        for _, _, fut, _, _ in self._pending:
            if not fut.done():
                fut.set_exception(BrokerError("broker is closing"))
        self._pending.clear()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 5.0)
        for slot in range(PUBLISH_CONNECTIONS):
            await self._drop(slot)
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self.is_connected = False


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
        self._publisher: _Publisher | None = None
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
        self._publisher = _Publisher(self)
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


def validate_envelope_size(envelope: bytes, limit: int) -> None:
    """Raise `PayloadTooLarge` when *envelope* exceeds *limit* UTF-8 bytes."""
    from .errors import PayloadTooLarge

    if len(envelope) > limit:
        raise PayloadTooLarge("event too large", len(envelope), limit)


__all__ += ["validate_envelope_size", "JSONError"]
