"""Tornado handlers: SSE streams, publishing, health and metrics, for mounting
into an existing `tornado.web.Application` (`Service.routes`,
`Service.attach`). What each route does lives in `ssepg.api`.

The stream handler answers the HTTP request itself and then takes the
connection over (`RequestHandler.detach`): from there on the dispatcher
writes to the socket directly, with no per-subscriber Tornado objects left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import tornado.web

from . import api
from .api import ApiError
from .log import access_log

if TYPE_CHECKING:
    from .service import Service

__all__ = [
    "TopicEventsHandler",
    "BatchPublishHandler",
    "HealthHandler",
    "MetricsHandler",
    "NotFoundHandler",
]


class _BaseHandler(tornado.web.RequestHandler):
    """JSON errors, bearer tokens, CORS and access logging for ssepg routes."""

    allow = api.ALLOW_TOPIC

    def initialize(self, service: Service) -> None:
        self.service = service
        self.config = service.config
        self._started = time.monotonic()
        self._topic_label = "-"

    def _request_summary(self) -> str:
        # Tornado's own logs name the request through this; the query string
        # may hold an access token, so it never appears.
        return f"{self.request.method} {self.request.path} ({self.request.remote_ip})"

    def compute_etag(self) -> None:
        return None

    def check_xsrf_cookie(self) -> None:
        # An application with xsrf_cookies guards its own forms; ssepg's
        # routes serve API clients without that cookie, and guard themselves
        # against other sites' pages (api.check_publisher), as they do when
        # ssepg's own HTTP front serves them.
        return

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    def _cors(self) -> dict[str, str]:
        return api.cors_headers(
            self.config.cors_origins, self.request.headers.get("Origin")
        )

    def _set_headers(self, headers: dict[str, str]) -> None:
        for name, value in headers.items():
            if name == "Vary":
                self.add_header(name, value)
            else:
                self.set_header(name, value)

    def prepare(self) -> None:
        size = sum(len(k) + len(v) + 4 for k, v in self.request.headers.get_all())
        api.check_request_size(self.request.uri or "", size)
        self._set_headers(self._cors())

    def options(self, *args: str) -> None:
        h = self.request.headers
        self._set_headers(
            api.preflight_headers(
                self.config.cors_origins,
                h.get("Origin"),
                self.allow,
                h.get("Access-Control-Request-Headers"),
            )
        )
        self.set_status(204)

    def _method_not_allowed(self, *args: str) -> None:
        raise ApiError(405, "method not allowed", {"Allow": self.allow})

    head = put = delete = patch = _method_not_allowed

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # send_error() cleared what prepare() set; without CORS headers a page
        # on another origin could not read why its request failed.
        self._set_headers(self._cors())
        exc = kwargs.get("exc_info", (None, None, None))[1]
        headers, body = api.error_answer(exc, status_code, self.allow)
        self._set_headers(headers)
        self.set_header("Content-Type", "application/json")
        self.finish(body)

    def on_finish(self) -> None:
        status = self.get_status()
        # Client mistakes (4xx) are routine; only server-side failures warn.
        access_log.log(
            logging.INFO if status < 500 else logging.WARNING,
            "%s %s %d %.3fs %s",
            self.request.method,
            self.request.path,
            status,
            time.monotonic() - self._started,
            self._topic_label,
        )

    def answer(self, body: bytes, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(body)


class _BodyLimitMixin(_BaseHandler):
    """Reads the request body in chunks and answers 413 as soon as it passes
    ``max_body_bytes``, before a large body is buffered."""

    def prepare(self) -> None:
        super().prepare()
        self._chunks: list[bytes] = []
        self._body_size = 0
        self._too_large = False
        self._holding = False
        self._publishing = False
        self._expected = -1
        if self.request.method != "POST":
            return
        length = self.request.headers.get("Content-Length")
        limit = self.config.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, "request body too large", size=int(length), limit=limit)
        self._expected = int(length) if length is not None and length.isdigit() else -1

    def data_received(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._too_large:
            return
        limit = self.config.max_body_bytes
        if self._body_size > limit:
            self._too_large = True
            self._chunks = []
            # Answer now; Tornado then closes the connection instead of
            # reading the rest (a chunked body past Tornado's own limit
            # would otherwise end in a bare 400 without a JSON body).
            exc = ApiError(
                413, "request body too large", size=self._body_size, limit=limit
            )
            self.send_error(413, exc_info=(ApiError, exc, None))
            return
        self._chunks.append(chunk)
        if self._body_size == self._expected and self.request.method == "POST":
            self._hold()

    def _hold(self) -> None:
        # From a complete body until its event is ingested, fan-outs may wait
        # a moment for it (Dispatcher.hold), so that events published
        # together leave in one write. Never earlier: a client sending its
        # body slowly must not hold back anyone's fan-out.
        if not self._holding:
            self._holding = True
            self.service.dispatcher.hold()

    async def settle(self, start: Any) -> None:
        """Run an `api` publish call and answer with what it reports. The
        hold lasts until the publish is over, even if the client left."""
        fut: asyncio.Future[bytes | ApiError] = (
            asyncio.get_running_loop().create_future()
        )
        self._publishing = True
        try:
            start(fut.set_result)
            result = await fut
        finally:
            self._publishing = False
        self._stop_holding()
        if isinstance(result, ApiError):
            raise result
        self.answer(result)

    def _stop_holding(self) -> None:
        if getattr(self, "_holding", False):
            self._holding = False
            self.service.dispatcher.release()

    def on_finish(self) -> None:
        self._stop_holding()
        super().on_finish()

    def on_connection_close(self) -> None:
        # A publish under way keeps its hold until it is over (see `settle`):
        # its event may still come.
        if not getattr(self, "_publishing", False):
            self._stop_holding()
        super().on_connection_close()

    def take_body(self) -> bytes:
        if self._too_large:
            raise ApiError(
                413,
                "request body too large",
                size=self._body_size,
                limit=self.config.max_body_bytes,
            )
        self._hold()
        body = b"".join(self._chunks)
        self._chunks = []
        return body


@tornado.web.stream_request_body
class TopicEventsHandler(_BodyLimitMixin):
    """``GET`` streams a topic (or up to 16, comma-separated) as SSE;
    ``POST`` publishes ``{"data": ...}`` to one topic."""

    allow = api.ALLOW_TOPIC

    def get(self, path: str) -> None:
        topics = api.parse_topics(path)
        self._topic_label = ",".join(topics)
        request = self.request
        api.check_token(
            self.config.listen_token,
            request.headers.get("Authorization"),
            request.query,
        )
        if api.stream_is_refused(self.service):
            headers, body = api.busy_answer()
            self._set_headers(headers)
            finished = self.finish(body)
            # Tornado keeps an HTTP/1.1 connection open unless the request
            # asked otherwise; the busy answer closes it, as its header says.
            conn_stream = getattr(request.connection, "stream", None)
            if conn_stream is not None:
                finished.add_done_callback(lambda _: conn_stream.close())
            return
        last_event_id = api.last_event_id(
            request.headers.get("Last-Event-ID"), request.query
        )
        is_gzip = api.accepts_gzip(request.headers.get("Accept-Encoding"))
        head = api.stream_head(is_gzip, self._cors())
        stream = self.detach()
        try:
            sock = stream.socket.dup()
        except (OSError, AttributeError):
            stream.close()
            return
        stream.close()
        sock.setblocking(False)
        self.service.dispatcher.add_stream(
            sock, topics, head=head, is_gzip=is_gzip, last_event_id=last_event_id
        )

    async def post(self, path: str) -> None:
        self._topic_label = path
        body = self.take_body()
        await self.settle(
            lambda done: api.publish(
                self.service, path, body, self.request.headers.get, done
            )
        )


@tornado.web.stream_request_body
class BatchPublishHandler(_BodyLimitMixin):
    """``POST {"events": [{"topic": .., "data": .., "event": ..}, ...]}``
    publishes up to 1,000 events; the answer lists one result per item, in
    order: ``{"topic", "id"}`` or ``{"error", "status"}``."""

    allow = api.ALLOW_BATCH

    def get(self) -> None:
        self._method_not_allowed()

    async def post(self) -> None:
        body = self.take_body()
        header = self.request.headers.get

        def start(done: Any) -> None:
            count = api.publish_batch(self.service, body, header, done)
            self._topic_label = f"{count} events"

        await self.settle(start)


class HealthHandler(_BaseHandler):
    """The health report; 503 while the listener is down or draining."""

    allow = api.ALLOW_READ

    def get(self) -> None:
        status, body = api.health_answer(self.service, self.request.query)
        self.answer(body, status)

    post = _BaseHandler._method_not_allowed


class MetricsHandler(_BaseHandler):
    """Prometheus text exposition of the service's figures."""

    allow = api.ALLOW_READ

    def get(self) -> None:
        body, content_type = self.service.metrics_text(
            self.request.headers.get("Accept")
        )
        self.set_header("Content-Type", content_type)
        self.finish(body)

    post = _BaseHandler._method_not_allowed


class NotFoundHandler(_BaseHandler):
    """JSON 404 for every path the application does not know."""

    def prepare(self) -> None:
        raise ApiError(404, "not found")
