"""Postgres connections as the broker uses them: opened within a bound,
awaited within a bound (a dead network path never hangs a task), closed
without raising, and retried with a capped, jittered backoff."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import Awaitable
from typing import Any, TypeVar

import psycopg

T = TypeVar("T")

CONNECT_TIMEOUT_S = 5.0
STATEMENT_TIMEOUT_S = 5.0
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 10.0


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
