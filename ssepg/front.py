"""The HTTP/1.1 front of a standalone ssepg server.

Tornado's HTTP/1.1 layer costs more per request than all of ssepg's own
publish work: on a small machine it tops out near 4,500 single-event POSTs/s
before any work is done. This front parses requests with httptools (the
parser behind uvicorn) straight from `asyncio.Protocol` callbacks and answers
ssepg's routes without a coroutine or handler object per request. Every other
request is handed to a Tornado `Application` (the example page, or routes of
your own), so a standalone server still mounts ordinary Tornado handlers.

`Service.listen` serves through this front; `Service.routes` and
`Service.attach` keep the Tornado handlers for existing applications. Both
carry the same behaviour, which lives in `ssepg.api`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

import httptools
import tornado.netutil
import tornado.web

from . import api
from .api import ApiError
from .fallback import hand_over, log_failure
from .log import access_log, http_log

if TYPE_CHECKING:
    from .service import Service

__all__ = ["Front"]

# Header blocks past this are not read at all: the connection is closed.
HARD_HEADER_BYTES = 64 * 1024
# The most one read hands over (asyncio and uvloop read 256 KiB at a time):
# a head whose line does not end is cut off once this much more than the
# hard limit has arrived (a head within the limit never comes that far).
MAX_READ_BYTES = 256 * 1024
# Bodies of requests handed to a Tornado application are buffered up to this.
MAX_FALLBACK_BODY_BYTES = 16 << 20
# A request must be complete (headers and body) this long after it began.
REQUEST_TIMEOUT_S = 60.0
# After a last answer has left, what the client still sends is read and
# dropped this long, so that the answer is not lost to a reset.
LINGER_S = 2.0
# Keep-alive connections idle this long are closed.
IDLE_TIMEOUT_S = 600.0
SWEEP_INTERVAL_S = 10.0

_TOPIC, _BATCH, _HEALTH, _METRICS, _OTHER = range(5)
# Requests refused before routing.
_BAD_URL, _URI_TOO_LONG, _BAD_VERSION, _UPGRADE, _BAD_CODING, _BAD_HOST = range(
    -1, -7, -1
)
_ALLOW = {
    _TOPIC: api.ALLOW_TOPIC,
    _BATCH: api.ALLOW_BATCH,
    _HEALTH: api.ALLOW_READ,
    _METRICS: api.ALLOW_READ,
    _OTHER: "",
}
_REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Request:
    """One request as it is being read."""

    __slots__ = (
        "method",
        "url",
        "path",
        "query",
        "headers",
        "header_bytes",
        "chunks",
        "body_size",
        "expected",
        "too_large",
        "keep_alive",
        "version",
        "route",
        "arg",
        "started",
        "head_done",
        "url_bytes",
    )

    def __init__(self) -> None:
        self.method = ""
        self.url = b""
        self.path = ""
        self.query = ""
        self.headers: list[tuple[str, str]] = []
        self.header_bytes = 0
        self.chunks: list[bytes] = []
        self.body_size = 0
        self.expected = -1
        self.too_large = False
        self.keep_alive = True
        self.version = "HTTP/1.1"
        self.route = _OTHER
        self.arg = ""
        self.started = time.monotonic()
        self.head_done = False
        self.url_bytes = 0

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


class Front:
    """Serves one `Service` over HTTP/1.1 on bound sockets.

    :param app: a Tornado application for every request that is not one of
        ssepg's routes; without one they get a JSON 404.
    :param health_only: serve only health and metrics (the health port).
    """

    def __init__(
        self,
        service: Service,
        app: tornado.web.Application | None = None,
        *,
        health_only: bool = False,
    ) -> None:
        self.service = service
        self.app = app
        self.health_only = health_only
        self.sockets: list[socket.socket] = []
        self._servers: list[asyncio.Server] = []
        self._starting: list[asyncio.Future[asyncio.Server]] = []
        self._connections: set[_Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self.is_stopped = False
        config = service.config
        self._base = config.base_path
        self._topic_prefix = config.base_path + "/"
        self._serve_health = health_only or config.health_port is None

    @property
    def port(self) -> int:
        """The TCP port of the first bound socket (useful with port 0)."""
        for sock in self.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return int(sock.getsockname()[1])
        raise RuntimeError("front has no TCP socket")

    def listen(self, port: int, address: str = "", reuse_port: bool = False) -> None:
        """Bind *port* (0 picks a free one) and start serving on the running
        loop. Binding happens now, so errors such as a port in use are raised
        here."""
        sockets = tornado.netutil.bind_sockets(
            port, address or None, reuse_port=reuse_port, backlog=4096
        )
        self.add_sockets(sockets)

    def add_sockets(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets:
            self.sockets.append(sock)
            self._starting.append(
                asyncio.ensure_future(
                    loop.create_server(
                        lambda: _Connection(self), sock=sock, backlog=4096
                    )
                )
            )
        if self._sweep is None:
            self._sweep = loop.call_later(SWEEP_INTERVAL_S, self._sweep_connections)

    async def _servers_started(self) -> None:
        for fut in self._starting:
            self._servers.append(await fut)
        self._starting.clear()

    def _sweep_connections(self) -> None:
        now = time.monotonic()
        for conn in list(self._connections):
            conn.check_timeouts(now)
        self._sweep = asyncio.get_running_loop().call_later(
            SWEEP_INTERVAL_S, self._sweep_connections
        )

    async def stop(self) -> None:
        """Stop accepting; idle keep-alive connections close now, busy ones
        after their answer."""
        self.is_stopped = True
        await self._servers_started()
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            conn.close_when_idle()

    async def close(self, timeout: float = 5.0) -> None:
        """`stop`, then wait up to *timeout* for answers in progress and drop
        what is left."""
        await self.stop()
        deadline = time.monotonic() + timeout
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self._connections):
            conn.abort()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for server in self._servers:
            await server.wait_closed()

    def route(self, path: str) -> tuple[int, str]:
        if not self.health_only:
            if path.startswith(self._topic_prefix) and path.endswith("/events"):
                middle = path[len(self._topic_prefix) : -len("/events")]
                if "/" not in middle:
                    return _TOPIC, unquote(middle, errors="replace")
            elif path == self._base:
                return _BATCH, ""
        if self._serve_health:
            if path == self.service.config.healthz:
                return _HEALTH, ""
            if path == "/metrics":
                return _METRICS, ""
        return _OTHER, ""


class _Connection(asyncio.Protocol):
    """One client connection. Requests are answered in order; while one
    waits (a publish awaiting Postgres), later pipelined ones queue."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.service = front.service
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        # Any HTTP/d.d passes the parser so that the answer can tell: a
        # higher HTTP/1 minor version is served as HTTP/1.1 (RFC 9112, 2.3),
        # other versions get 505.
        self.parser.set_dangerous_leniencies(lenient_version=True)
        self.current: _Request | None = None
        self.queue: collections.deque[_Request] = collections.deque()
        self.busy = False
        self.closing = False
        self.last_active = time.monotonic()
        self.remote_ip = ""
        self._close_callback: Any = None
        self._holding = False
        # Bytes of a request head that has not ended yet, as far as counted.
        self._head_bytes = 0
        self._linger: asyncio.TimerHandle | None = None
        # Inside `_next`: answers given there must not call it again.
        self._in_next = False
        # The client asked to switch protocols: what follows is not HTTP/1.1.
        self._upgraded = False
        # A parse error met while an answer was pending: answered after it.
        self._failure: tuple[_Request, ApiError] | None = None

    # asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, though
        # they offer the same methods.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote_ip = peer[0] if isinstance(peer, tuple) else ""
        self.front._connections.add(self)
        if self.front.is_stopped:
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.front._connections.discard(self)
        # A publish that is under way keeps its hold until it is over
        # (`_finish` comes then, client or not): its event may still come.
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        callback, self._close_callback = self._close_callback, None
        if callback is not None:
            callback()

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self._upgraded or self.closing:
            return
        # Whether this chunk begins inside a request head that is not over.
        inside_head = self.current is not None and not self.current.head_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrades (WebSocket, h2c, CONNECT) are not offered: a complete
            # request is answered as a plain one, the connection closes after
            # it, and whatever the client sends in the new protocol is
            # ignored.
            self._upgraded = True
            if self.transport is not None:
                self.transport.pause_reading()
            if self.current is not None or not self.queue:
                self._fail(400, "protocol upgrades are not supported")
                return
            last = self.queue[-1]
            last.keep_alive = False
            has_body = last.expected > 0 or last.header("transfer-encoding") is not None
            if last.method == "CONNECT" or (has_body and not last.body_size):
                # A tunnel is never offered; and a body the parser took for
                # the new protocol's first bytes leaves a request that cannot
                # be served as it was meant.
                last.route = _UPGRADE
        except httptools.HttpParserInvalidMethodError:
            # Not a method HTTP defines: no route can say what it allows.
            self._fail(400, "unknown method")
            return
        except httptools.HttpParserError:
            self._fail(400, "bad request")
            return
        req = self.current
        if req is not None and not req.head_done and not self.closing:
            # The parser keeps a header line until it ends, so its size is
            # only seen here, counted from the read in which the head began
            # (the bytes of that read before it do not reach the limit on
            # their own). Past the limit the client is answered and dropped
            # instead of buffered further.
            self._head_bytes = (
                self._head_bytes + len(data) if inside_head else len(data)
            )
            if self._head_bytes > HARD_HEADER_BYTES + MAX_READ_BYTES:
                if self.parser.get_http_version() == "0.0":
                    # Still in the request line.
                    self._fail(414, "uri too long")
                else:
                    self._fail(431, "request headers too large")
                return
        self._next()

    # httptools callbacks --------------------------------------------------------

    # Once the connection is closing (an early answer, an abort), whatever
    # the parser still finds in the buffer is ignored.

    def on_message_begin(self) -> None:
        self.current = _Request()
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        req = self.current
        if req is not None and not self.closing:
            req.url_bytes += len(url)
            if len(req.url) + len(url) > HARD_HEADER_BYTES:
                # Kept no further; answered 414 once the head is read.
                req.route = _URI_TOO_LONG
                return
            req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.current
        if req is None or self.closing:
            return
        req.header_bytes += len(name) + len(value) + 4
        if req.header_bytes > HARD_HEADER_BYTES:
            # Not read at all, not answered: a client this far off the limit
            # gets no more of the server's time.
            self.abort()
            return
        # The parser leaves trailing whitespace on a value; it is not part
        # of it (RFC 9110, 5.5).
        req.headers.append(
            (name.decode("latin-1").lower(), value.decode("latin-1").rstrip(" \t"))
        )

    def on_headers_complete(self) -> None:
        req = self.current
        if req is None or self.closing:
            return
        req.head_done = True
        parser = self.parser
        req.method = parser.get_method().decode("ascii", "replace")
        version = parser.get_http_version()
        if version[:2] == "1." and version != "1.0":
            version = "1.1"
        req.version = "HTTP/" + version
        req.keep_alive = parser.should_keep_alive()
        if version not in ("1.1", "1.0"):
            req.route = _BAD_VERSION
            req.keep_alive = False
            return
        if req.route == _URI_TOO_LONG or len(req.url) > api.MAX_URI_BYTES:
            req.route = _URI_TOO_LONG
            return
        if req.method == "CONNECT":
            return  # refused once complete (see data_received)
        hosts = 0
        codings = []
        for key, value in req.headers:
            if key == "host":
                hosts += 1
            elif key == "transfer-encoding":
                codings.append(value)
        if codings and (
            version == "1.0" or ",".join(codings).replace(" ", "").lower() != "chunked"
        ):
            # Only a plain chunked body is understood; a body in a coding
            # ssepg cannot undo (or one it is asked to ignore) is refused
            # rather than read as something else. HTTP/1.0 has no transfer
            # codings: its framing is faulty (RFC 9112, 6.1).
            req.route = _BAD_CODING
            req.keep_alive = False
            return
        if hosts != 1 and version == "1.1":
            # RFC 9112, 3.2: exactly one Host header in an HTTP/1.1 request.
            req.route = _BAD_HOST
            return
        try:
            url = httptools.parse_url(req.url)
        except httptools.HttpParserInvalidURLError:
            req.route = _BAD_URL
            return
        req.path = url.path.decode("latin-1")
        req.query = (url.query or b"").decode("latin-1")
        req.route, req.arg = self.front.route(req.path)
        length = req.header("content-length")
        if length is not None and length.isdigit():
            req.expected = int(length)
        limit = self._body_limit(req)
        if req.expected > limit:
            req.too_large = True
            req.body_size = req.expected
            self._early_413(req)
        elif req.header("expect") == "100-continue" and self.transport is not None:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        req = self.current
        if req is None or self.closing:
            return
        req.body_size += len(body)
        if req.too_large:
            return
        if req.body_size > self._body_limit(req):
            req.too_large = True
            req.chunks = []
            self._early_413(req)
            return
        req.chunks.append(body)

    def on_message_complete(self) -> None:
        req, self.current = self.current, None
        if req is not None and not self.closing:
            self.queue.append(req)

    # Answering ------------------------------------------------------------------

    def _body_limit(self, req: _Request) -> int:
        if req.route == _OTHER:
            return MAX_FALLBACK_BODY_BYTES
        return int(self.service.config.max_body_bytes)

    def _early_413(self, req: _Request) -> None:
        # Answer at once rather than read a body that will be refused; the
        # connection closes after the answer.
        req.keep_alive = False
        if not self.busy and not self.queue:
            self._answer_error(req, self._too_large(req))

    def _too_large(self, req: _Request) -> ApiError:
        return ApiError(
            413,
            "request body too large",
            size=req.body_size,
            limit=self._body_limit(req),
        )

    def _next(self) -> None:
        # Requests answered at once (an embedded publish, an error) come back
        # through `_finish`; the loop here takes their successors, so that a
        # long pipeline is served without recursion.
        if self._in_next:
            return
        self._in_next = True
        try:
            while self.queue and not self.busy and not self.closing:
                self._dispatch(self.queue.popleft())
            if self._failure is not None and not self.busy and not self.closing:
                failed, error = self._failure
                self._failure = None
                self._answer_error(failed, error)
        finally:
            self._in_next = False

    def _dispatch(self, req: _Request) -> None:
        route = req.route
        method = req.method
        try:
            if route == _URI_TOO_LONG:
                raise ApiError(
                    414, "uri too long", size=req.url_bytes, limit=api.MAX_URI_BYTES
                )
            if route == _BAD_VERSION:
                raise ApiError(505, "http version not supported")
            if route == _BAD_HOST:
                raise ApiError(400, "an HTTP/1.1 request needs one host header")
            if route == _UPGRADE:
                raise ApiError(400, "protocol upgrades are not supported")
            if route < 0:
                raise ApiError(400, "bad request")
            if req.too_large:
                raise self._too_large(req)
            api.check_request_size(req.url.decode("latin-1"), req.header_bytes)
            if route == _OTHER:
                self._fallback(req)
                return
            if method == "OPTIONS":
                self._answer(
                    req,
                    204,
                    b"",
                    api.preflight_headers(
                        self.service.config.cors_origins,
                        req.header("origin"),
                        _ALLOW[route],
                        req.header("access-control-request-headers"),
                    ),
                )
            elif route == _TOPIC and method == "GET":
                self._stream(req)
            elif route == _TOPIC and method == "POST":
                self._start(req)
                api.publish(
                    self.service,
                    req.arg,
                    req.body,
                    req.header,
                    lambda result: self._finish(req, result),
                )
            elif route == _BATCH and method == "POST":
                self._start(req)
                api.publish_batch(
                    self.service,
                    req.body,
                    req.header,
                    lambda result: self._finish(req, result),
                )
            elif route == _HEALTH and method == "GET":
                status, body = api.health_answer(self.service, req.query)
                self._answer(req, status, body)
            elif route == _METRICS and method == "GET":
                body, content_type = self.service.metrics_text(req.header("accept"))
                self._answer(req, 200, body, content_type=content_type)
            else:
                raise ApiError(405, "method not allowed", {"Allow": _ALLOW[route]})
        except ApiError as exc:
            self._finish(req, exc)
        except Exception:
            http_log.error("error answering %s %s", method, req.path, exc_info=True)
            self._finish(req, ApiError(500, "internal error"))

    def _start(self, req: _Request) -> None:
        # An answer that may come later: hold later requests back, and let
        # fan-outs wait a moment for this event (Dispatcher.hold).
        self.busy = True
        self._holding = True
        self.service.dispatcher.hold()

    def _release_hold(self) -> None:
        if self._holding:
            self._holding = False
            self.service.dispatcher.release()

    def _finish(self, req: _Request, result: bytes | ApiError) -> None:
        self._release_hold()
        if isinstance(result, ApiError):
            self._answer_error(req, result)
        else:
            self._answer(req, 200, result)
        self.busy = False
        self._next()

    def _answer_error(self, req: _Request, exc: ApiError) -> None:
        headers, body = api.error_answer(
            exc, exc.status_code, _ALLOW.get(req.route, "")
        )
        self._answer(req, exc.status_code, body, headers)

    def _answer(
        self,
        req: _Request,
        status: int,
        body: bytes,
        headers: api.Headers | None = None,
        content_type: str = "application/json",
    ) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        keep_alive = req.keep_alive and not self.front.is_stopped
        merged = {"Cache-Control": "no-store"}
        merged.update(
            api.cors_headers(self.service.config.cors_origins, req.header("origin"))
        )
        if headers:
            merged.update(headers)
        if merged.pop("Connection", None) == "close":
            keep_alive = False
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        if status != 204:
            lines.append(f"Content-Type: {content_type}")
            lines.append(f"Content-Length: {len(body)}")
        lines.extend(f"{name}: {value}" for name, value in merged.items())
        if not keep_alive:
            lines.append("Connection: close")
        elif req.version == "HTTP/1.0":
            # Persistent only because the client asked: say it is granted.
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        transport.write(head if req.method == "HEAD" or status == 204 else head + body)
        self._log(req, status)
        if not keep_alive:
            self._close_after_answer()

    def _log(self, req: _Request, status: int) -> None:
        if access_log.isEnabledFor(logging.INFO):
            # The path only: the query string may carry an access token.
            access_log.log(
                logging.INFO if status < 500 else logging.WARNING,
                "%s %s %d %.3fs",
                req.method or "-",  # a request line that could not be read
                req.path or "-",
                status,
                time.monotonic() - req.started,
            )

    def _fail(self, status: int, message: str) -> None:
        # The request stream cannot be parsed: the requests read before the
        # broken one are answered first, then the error, then the connection
        # closes.
        req = self.current or _Request()
        req.keep_alive = False
        self.current = None
        self._failure = (req, ApiError(status, message))
        if self.transport is not None:
            self.transport.pause_reading()
        self._next()

    # Streams ----------------------------------------------------------------

    def _stream(self, req: _Request) -> None:
        service = self.service
        config = service.config
        topics = api.parse_topics(req.arg)
        api.check_token(config.listen_token, req.header("authorization"), req.query)
        if api.stream_is_refused(service):
            headers, body = api.busy_answer()
            content_type = headers.pop("Content-Type")
            self._answer(req, 200, body, headers, content_type=content_type)
            return
        self.busy = True
        self._hand_over(req, topics, 0.0)

    def _hand_over(self, req: _Request, topics: tuple[str, ...], waited: float) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        if transport.get_write_buffer_size():
            # An earlier pipelined answer has not left yet: the stream must
            # neither overtake it nor cut it off. A client that reads none of
            # it within the request timeout gets it all the same, then the
            # connection closes without a stream.
            if waited >= REQUEST_TIMEOUT_S:
                self.closing = True
                transport.close()
                return
            delay = min(0.25, 0.01 + waited / 4)
            asyncio.get_running_loop().call_later(
                delay, self._hand_over, req, topics, waited + delay
            )
            return
        config = self.service.config
        is_gzip = api.accepts_gzip(req.header("accept-encoding"))
        cors = api.cors_headers(config.cors_origins, req.header("origin"))
        sock = self._take_socket()
        if sock is None:
            return
        self.service.dispatcher.add_stream(
            sock,
            topics,
            head=api.stream_head(is_gzip, cors),
            is_gzip=is_gzip,
            last_event_id=api.last_event_id(req.header("last-event-id"), req.query),
        )

    def _take_socket(self) -> socket.socket | None:
        # The stream belongs to the dispatcher from here on: it gets its own
        # descriptor of the connection, and the transport lets go of it.
        transport = self.transport
        if transport is None:
            return None
        raw = transport.get_extra_info("socket")
        try:
            sock = socket.socket(fileno=os.dup(raw.fileno()))
        except OSError:
            self.abort()
            return None
        sock.setblocking(False)
        self.closing = True
        self.queue.clear()
        transport.abort()
        return sock

    # Other requests: the Tornado application ----------------------------------

    def _fallback(self, req: _Request) -> None:
        app = self.front.app
        if app is None:
            raise ApiError(404, "not found")
        self.busy = True
        task = asyncio.ensure_future(hand_over(app, self, req))
        task.add_done_callback(log_failure)

    def fallback_done(self, keep_alive: bool) -> None:
        self._close_callback = None
        self.busy = False
        if not keep_alive or self.front.is_stopped:
            self._close_after_answer()
            return
        self._next()

    # Lifetime -------------------------------------------------------------------

    def _close_after_answer(self) -> None:
        # Closing a socket with unread input sends a reset, and a reset makes
        # the client's kernel throw away the answer it has not read yet (a
        # 413 or 431 to a client still sending, say). So the answer is
        # followed by a FIN, what the client still sends is read and dropped,
        # and the connection goes when the client closes it, or `LINGER_S`
        # after the answer has left.
        self.closing = True
        transport = self.transport
        if transport is None:
            return
        if not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except (OSError, RuntimeError):
            transport.abort()
            return
        transport.resume_reading()
        now = time.monotonic()
        self._linger = asyncio.get_running_loop().call_later(
            LINGER_S, self._linger_check, -1, now
        )

    def _linger_check(self, last_size: int, progress_at: float) -> None:
        # An answer still leaving is never cut off while the client reads
        # it; a client that reads none of it for REQUEST_TIMEOUT_S is
        # dropped. Once it has left, LINGER_S more lets the kernel's send
        # buffer drain before the reset.
        transport = self.transport
        if transport is None:
            return
        size = transport.get_write_buffer_size()
        now = time.monotonic()
        if size == 0 and last_size == 0:
            self.abort()
            return
        if size and size == last_size and now - progress_at > REQUEST_TIMEOUT_S:
            self.abort()
            return
        if size != last_size:
            progress_at = now
        self._linger = asyncio.get_running_loop().call_later(
            LINGER_S, self._linger_check, size, progress_at
        )

    def close_when_idle(self) -> None:
        if not self.busy and not self.queue and self.transport is not None:
            self.closing = True
            self.transport.close()

    def check_timeouts(self, now: float) -> None:
        if self.busy:
            return
        if self.current is not None and now - self.current.started > REQUEST_TIMEOUT_S:
            self._fail(408, "request timeout")
        elif self.current is None and now - self.last_active > IDLE_TIMEOUT_S:
            self.close_when_idle()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
