"""The publish side of `PostgresBroker`: concurrent publishes batched into
one NOTIFY statement per round trip, on up to `PUBLISH_CONNECTIONS`
connections driven through libpq directly."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from typing import TYPE_CHECKING, Any, Protocol

import psycopg

from .errors import BrokerError, PublishError
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

if TYPE_CHECKING:
    from .broker import PostgresBroker

# A batch of NOTIFYs is one statement; these keep it a reasonable size.
MAX_BATCH_EVENTS = 2000
MAX_BATCH_BYTES = 4 << 20
PUBLISH_CONNECTIONS = 2
# A further publish connection joins only when this many events wait: with
# few publishes in flight, one connection carries all that came during its
# last round trip in one statement, where two would alternate small ones
# (each statement costs a round trip of system calls on both sides).
EXTRA_CONNECTION_BACKLOG = 256

# Deadlines and the publish latency figure read this clock, not the loop's:
# uvloop's loop.time() moves in whole milliseconds, once per loop turn.
_now = time.monotonic


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


_TEXT_OID = 25
_ARRAY_HEAD = struct.Struct("!iiIii")
_LENGTH = struct.Struct("!i")


def _text_array(items: list[bytes]) -> bytes:
    # A text[] in Postgres' binary format: one dimension, no NULLs, then
    # each element's length and bytes. The bytes reach pg_notify as they
    # are, with no quoting to add here nor JSON parsing there (Postgres'
    # json operators refuse what JSON allows, such as a lone "\ud800").
    pack = _LENGTH.pack
    return _ARRAY_HEAD.pack(1, 0, _TEXT_OID, len(items), 1) + b"".join(
        [pack(len(item)) + item for item in items]
    )


def _batch_params(batch: list[_Item]) -> list[bytes]:
    """The channels and the envelopes of *batch*, as two binary text[]."""
    return [
        _text_array([c.encode("ascii") for c, _, _, _, _ in batch]),
        _text_array([p for _, p, _, _, _ in batch]),
    ]


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
                "PREPARE ssepg_notify_many(text[], text[]) AS SELECT "
                "count(pg_notify(c, p)) FROM unnest($1, $2) AS t(c, p)",
            ):
                await _bounded(conn, conn.execute(statement), STATEMENT_TIMEOUT_S)
        except BaseException:
            await _close_quietly(conn)
            raise
        return cls(conn, loop)

    @property
    def is_usable(self) -> bool:
        return not self.is_broken and not self.conn.closed

    async def run(
        self,
        name: bytes,
        params: list[bytes],
        timeout: float,
        formats: list[int] | None = None,
    ) -> None:
        """Execute the prepared statement *name* with *params*, in text
        format unless *formats* says otherwise (1 for binary), one each.

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
            pg.send_query_prepared(name, params, param_formats=formats)
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


class Publisher:
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
        # Sent events heard back before their confirmation: committed, so a
        # retry after a lost connection must not send them again.
        self._heard: set[_Waiter] = set()
        self._log = RateLimitedLog(broker_log, 30)
        self.batches = 0
        self.is_connected = False

    def submit(
        self, channel: str, payload: bytes, timeout: float, topic: str
    ) -> asyncio.Future[None]:
        loop = self._loop
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((channel, payload, fut, _now() + timeout, topic))
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
        deadline = _now() + timeout
        self._pending.extend(
            (channel, payload, _Share(group, index), deadline, topic)
            for index, (channel, payload, topic) in enumerate(entries)
        )
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_later(timeout, self._expire)
        self._kick()
        return group.future

    def heard_back(self, waiter: _Waiter) -> None:
        """*waiter*'s event was heard back: Postgres committed it."""
        if not waiter.done():
            self._heard.add(waiter)

    def _expire(self) -> None:
        # One timer serves every publish (no task or timer each): it fails
        # the futures past their deadline, then waits for the next deadline.
        # Queued and in-flight items are in deadline order, so only the head
        # of each list is looked at.
        self._deadline_timer = None
        loop = self._loop
        now = _now()
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
            batch = self._unsettled(batch)
            if not batch:
                return
            try:
                pc = await self._connection(slot)
                if len(batch) == 1:
                    channel, payload = batch[0][0], batch[0][1]
                    await pc.run(pc.ONE, [channel.encode("ascii"), payload], timeout)
                else:
                    await pc.run(pc.MANY, _batch_params(batch), timeout, [1, 1])
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
            self.batches += 1
            self._confirm(batch)
            return
        for _, _, fut, _, _ in self._unsettled(batch):
            fut.set_exception(BrokerError("Postgres is unreachable"))

    def _unsettled(self, batch: list[_Item]) -> list[_Item]:
        # What of a batch is still to send: neither over nor heard back. A
        # heard event was committed by an earlier attempt; it counts as
        # taken now, instead of going out (and being delivered) twice.
        if self._heard:
            heard = [item for item in batch if item[2] in self._heard]
            if heard:
                self._confirm(heard)
        return [item for item in batch if not item[2].done()]

    def _confirm(self, batch: list[_Item]) -> None:
        # Postgres took these: wake their publishers and count them, here in
        # one pass rather than in a callback per future.
        report = self._broker.on_published
        timeout = self._broker.config.publish_timeout
        heard = self._heard
        now = _now()
        for _, _, fut, deadline, topic in batch:
            if heard:
                heard.discard(fut)
            if not fut.done():
                fut.set_result(None)
                if report is not None:
                    report(topic, now - (deadline - timeout))

    async def _send_each(self, slot: int, batch: list[_Item]) -> None:
        timeout = self._broker.config.publish_timeout
        for channel, payload, fut, deadline, topic in batch:
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
                self.batches += 1
                self._confirm([(channel, payload, fut, deadline, topic)])

    def drop_connections(self) -> None:
        """Shut every publish connection down: a statement in flight fails at
        once and is retried on a new connection instead of waiting out the
        publish timeout on a dead path; idle connections are replaced."""
        for pc in self._conns:
            if pc is not None:
                pc.kill()
        self.is_connected = False

    async def close(self) -> None:
        self._log.report()
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
