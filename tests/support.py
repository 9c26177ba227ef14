"""Helpers for tests: services on free ports, a raw SSE client, HTTP calls
and condition waits with generous deadlines (never fixed sleeps)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

from ssepg import Config, Service
from ssepg.service import bound_port

DEFAULT_TEST_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

# Deadlines are generous: the machines running the suite are shared and busy.
DEADLINE_S = 20.0


def dsn_with_dbname(dsn: str, dbname: str) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return make_conninfo(**params)


def unique_topic(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = DEADLINE_S,
    interval: float = 0.02,
    message: str = "condition",
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        await asyncio.sleep(interval)


@dataclass
class Running:
    service: Service
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


# Test defaults: short intervals so tests see effects quickly.
TEST_CONFIG: dict[str, Any] = {
    "graceful_drain": 0.0,
    "keep_alive": 15.0,
    "queue_poll_interval": 1.0,
    "memory_cleanup_interval": 3600.0,
}


@dataclass
class ServiceFactory:
    running: list[Running] = field(default_factory=list)
    tornado_server: bool = False

    async def start(self, wait_listen: bool = True, **overrides: Any) -> Running:
        """Start a service on a free port of 127.0.0.1."""
        settings = {**TEST_CONFIG, **overrides}
        service = await Service.start(Config(**settings))
        server = service.listen(0, "127.0.0.1", tornado_server=self.tornado_server)
        running = Running(service, bound_port(server))
        self.running.append(running)
        if wait_listen and service.config.dsn:
            await wait_until(
                lambda: service.broker.is_connected, message="listener connected"
            )
        return running

    async def close_all(self) -> None:
        for r in self.running:
            await r.service.close(drain=0)
        self.running.clear()


async def http(
    method: str,
    url: str,
    body: bytes | str | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = DEADLINE_S,
) -> HTTPResponse:
    if isinstance(body, dict):
        body = json.dumps(body)
    if body is None and method in ("POST", "PUT", "PATCH"):
        body = b""
    request = HTTPRequest(
        url,
        method=method,
        body=body,
        headers=headers,
        request_timeout=timeout,
        allow_nonstandard_methods=True,
        decompress_response=False,
    )
    return await AsyncHTTPClient().fetch(request, raise_error=False)


async def publish(
    running: Running, topic: str, data: Any, **extra: Any
) -> dict[str, Any]:
    response = await http(
        "POST", running.url(f"/topics/{topic}/events"), {"data": data, **extra}
    )
    assert response.code == 200, (response.code, response.body)
    return json.loads(response.body)


@dataclass
class SSEEvent:
    id: str | None
    event: str
    data: str

    @property
    def json(self) -> Any:
        return json.loads(self.data)


class SSEClient:
    """A minimal raw-socket SSE client: sends the GET itself, parses the
    response head and then the event stream (WHATWG rules), and can inflate
    gzip. Keeps every byte received in ``raw``."""

    def __init__(
        self,
        port: int,
        path: str,
        headers: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.port = port
        self.path = path
        self.host = host
        self.headers = headers or {}
        self.status: int | None = None
        self.response_headers: dict[str, str] = {}
        self.raw = bytearray()
        self.body = bytearray()
        self.events: list[SSEEvent] = []
        self.comments: list[str] = []
        self.retry: int | None = None
        self.closed = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflate: Any = None
        self._text = ""
        self._pending: dict[str, Any] = {}

    async def connect(self, timeout: float = DEADLINE_S) -> SSEClient:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Accept: text/event-stream",
        ]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), timeout)
        self.raw += head
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                self.response_headers[k.strip().lower()] = v.strip()
        if self.response_headers.get("content-encoding") == "gzip":
            self._inflate = zlib.decompressobj(wbits=31)
        self._task = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while True:
                chunk = await self._reader.read(65536)
                if not chunk:
                    break
                self.raw += chunk
                if self._inflate is not None:
                    chunk = self._inflate.decompress(chunk)
                self.body += chunk
                self._parse(chunk.decode("utf-8"))
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True

    def _parse(self, text: str) -> None:
        self._text += text.replace("\r\n", "\n").replace("\r", "\n")
        while "\n" in self._text:
            line, self._text = self._text.split("\n", 1)
            if line == "":
                if "data" in self._pending:
                    self.events.append(
                        SSEEvent(
                            self._pending.get("id"),
                            self._pending.get("event", "message"),
                            "\n".join(self._pending["data"]),
                        )
                    )
                self._pending = {}
            elif line.startswith(":"):
                self.comments.append(line[1:].strip())
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    self._pending.setdefault("data", []).append(value)
                elif name in ("id", "event"):
                    self._pending[name] = value
                elif name == "retry" and value.isdigit():
                    self.retry = int(value)

    def data_events(self) -> list[SSEEvent]:
        """Events other than ssepg's own signals."""
        return [e for e in self.events if not e.event.startswith("ssepg-")]

    async def wait_events(
        self, count: int, timeout: float = DEADLINE_S
    ) -> list[SSEEvent]:
        await wait_until(
            lambda: len(self.data_events()) >= count or self.closed,
            timeout,
            message=f"{count} events on {self.path}",
        )
        events = self.data_events()
        assert len(events) >= count, (
            f"stream closed after {len(events)} of {count} events"
        )
        return events

    async def wait_comment(self, text: str, timeout: float = DEADLINE_S) -> None:
        await wait_until(
            lambda: any(text in c for c in self.comments),
            timeout,
            message=f"comment {text!r}",
        )

    async def wait_closed(self, timeout: float = DEADLINE_S) -> None:
        await wait_until(lambda: self.closed, timeout, message="stream closed")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()


async def subscribe(
    running: Running, topic: str, headers: dict[str, str] | None = None, query: str = ""
) -> SSEClient:
    """Open a stream. The server registers a stream before it sends the
    response head, so once `connect` returns, the stream receives events."""
    return await SSEClient(
        running.port, f"/topics/{topic}/events{query}", headers
    ).connect()
