"""Requests the front does not answer itself go to a Tornado application:
`hand_over` runs the application on one, and `TornadoConnection` is what
the application writes its answer to, with HTTP/1.1 framing onto the
front's connection."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import tornado.httputil
import tornado.web

from .log import http_log

if TYPE_CHECKING:
    from .front import _Connection, _Request


class _Context:
    def __init__(self, remote_ip: str) -> None:
        self.remote_ip = remote_ip
        self.protocol = "http"
        self.address = (remote_ip, 0)


class TornadoConnection(tornado.httputil.HTTPConnection):
    """What a Tornado application writes its answer to: HTTP/1.1 framing
    (a fixed length, or chunked when the handler streams) onto the
    front's connection."""

    def __init__(self, owner: _Connection, req: _Request) -> None:
        self.owner = owner
        self.req = req
        self.context = _Context(owner.remote_ip)
        self._chunked = False
        self._keep_alive = req.keep_alive
        self._no_body = req.method == "HEAD"

    def set_close_callback(self, callback: Any) -> None:
        self.owner._close_callback = callback

    def _done(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def write_headers(
        self,
        start_line: tornado.httputil.RequestStartLine
        | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
        chunk: bytes | None = None,
    ) -> asyncio.Future[None]:
        assert isinstance(start_line, tornado.httputil.ResponseStartLine)
        code = start_line.code
        if code in (204, 304) or 100 <= code < 200:
            self._no_body = True
        elif "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            if self.req.version == "HTTP/1.1":
                headers["Transfer-Encoding"] = "chunked"
                self._chunked = True
            else:
                self._keep_alive = False
        if headers.get("Connection", "").lower() == "close":
            self._keep_alive = False
        if not self._keep_alive:
            headers["Connection"] = "close"
        elif self.req.version == "HTTP/1.0":
            headers["Connection"] = "keep-alive"
        lines = [f"HTTP/1.1 {code} {start_line.reason}"]
        lines.extend(f"{name}: {value}" for name, value in headers.get_all())
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if chunk:
            data += self._frame(chunk)
        self._write(data)
        return self._done()

    def _frame(self, chunk: bytes) -> bytes:
        if self._no_body or not chunk:
            return b""
        if self._chunked:
            return b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        return chunk

    def _write(self, data: bytes) -> None:
        transport = self.owner.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def write(self, chunk: bytes) -> asyncio.Future[None]:
        self._write(self._frame(chunk))
        return self._done()

    def finish(self) -> None:
        if self._chunked and not self._no_body:
            self._write(b"0\r\n\r\n")
        self.owner.fallback_done(self._keep_alive)


async def hand_over(
    app: tornado.web.Application, owner: _Connection, req: _Request
) -> None:
    """Run *app* on *req*, a request read in full by *owner*: its answer
    goes out through a `TornadoConnection`."""
    conn = TornadoConnection(owner, req)
    delegate = app.start_request(owner, conn)
    headers = tornado.httputil.HTTPHeaders()
    for name, value in req.headers:
        headers.add(name, value)
    start_line = tornado.httputil.RequestStartLine(
        req.method, req.url.decode("latin-1"), req.version
    )
    started = delegate.headers_received(start_line, headers)
    if started is not None:
        await started
    if req.chunks:
        received = delegate.data_received(req.body)
        if received is not None:
            await received
    delegate.finish()


def log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        http_log.error("request to the application failed", exc_info=task.exception())
