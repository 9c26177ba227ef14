"""Tornado handlers: SSE streams, publishing, health and metrics.

The stream handler answers the HTTP request itself and then takes the
connection over (`RequestHandler.detach`): from there on the dispatcher
writes to the socket directly, with no per-subscriber Tornado objects left.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import re
import time
from typing import TYPE_CHECKING, Any

import tornado.web
import ujson

from ._fast import (
    JSONError,
    array_spans,
    compact,
    decode_string,
    is_event_name,
    object_spans,
    span_is_null,
    span_is_string,
)
from .errors import BrokerError, InvalidTopic, PayloadTooLarge, PublishError
from .log import access_log, http_log
from .topics import normalize_topic

if TYPE_CHECKING:
    from .service import Service

__all__ = [
    "ApiError",
    "TopicEventsHandler",
    "BatchPublishHandler",
    "HealthHandler",
    "MetricsHandler",
    "NotFoundHandler",
    "parse_topics",
    "parse_publish_body",
    "accepts_gzip",
]

MAX_TOPICS_PER_STREAM = 16
# Header blocks above this get 431. Tornado itself is given more room
# (Service.listen) so that the answer can be a JSON 431, not a dropped
# connection; past that room it still drops the connection.
MAX_HEADER_BYTES = 16 * 1024
# Request targets (path and query) above this get 414; a resume id in the
# query (last_event_id) may itself be several KiB of junk.
MAX_URI_BYTES = 16 * 1024
MAX_BATCH_ITEMS = 1000
ALLOW_TOPIC = "GET, POST, OPTIONS"
ALLOW_BATCH = "POST, OPTIONS"
ALLOW_READ = "GET, OPTIONS"
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID, Cache-Control"
CORS_MAX_AGE_S = 600

_STATUS_MESSAGES = {
    400: "bad request",
    401: "unauthorized",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    408: "request timeout",
    411: "length required",
    413: "request body too large",
    414: "uri too long",
    415: "unsupported media type",
    431: "request headers too large",
    500: "internal error",
    503: "service unavailable",
}

_BEARER_RE = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)
_QVALUE_RE = re.compile(r"^\s*q\s*=\s*([0-9.]+)\s*$", re.IGNORECASE)


class ApiError(tornado.web.HTTPError):
    """An HTTP error with a JSON body: ``{"error": message, **extra}``."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status)
        self.body = {"error": message, **extra}
        self.headers = headers or {}


def parse_topics(path: str) -> tuple[str, ...]:
    """Topic ids of a URL path segment, ``a`` or ``a,b,c`` (at most 16),
    lower-cased, duplicates removed, order kept.

    :raises ApiError: 400 on an invalid id or too many topics.
    """
    names = path.split(",")
    if len(names) > MAX_TOPICS_PER_STREAM:
        raise ApiError(400, f"too many topics (limit {MAX_TOPICS_PER_STREAM})")
    topics: list[str] = []
    for name in names:
        try:
            topic = normalize_topic(name)
        except InvalidTopic:
            raise ApiError(400, "invalid topic") from None
        if topic not in topics:
            topics.append(topic)
    return tuple(topics)


def parse_publish_body(body: bytes, start: int = 0, end: int = -1) -> tuple[bytes, str]:
    """``(compact data, event name)`` of a publish body ``{"data": .., "event": ..}``.

    :raises ApiError: 400 with the reason.
    """
    try:
        spans = object_spans(body, start, end)
    except JSONError as exc:
        raise ApiError(400, str(exc)) from None
    data = spans.get("data")
    if data is None:
        raise ApiError(400, "missing data")
    if span_is_null(body, *data):
        raise ApiError(400, "data must not be null")
    event = "message"
    ev = spans.get("event")
    if ev is not None and not span_is_null(body, *ev):
        if not span_is_string(body, *ev):
            raise ApiError(400, "event must be a string")
        event = decode_string(body, *ev)
        if not is_event_name(event):
            raise ApiError(400, "invalid event name")
    return compact(body, *data), event


def accepts_gzip(header: str | None) -> bool:
    """Whether an ``Accept-Encoding`` value admits gzip (``q=0`` refuses it;
    an explicit gzip entry wins over ``*``)."""
    if not header:
        return False
    star: bool | None = None
    for item in header.split(","):
        name, _, params = item.partition(";")
        name = name.strip().lower()
        q = 1.0
        for param in params.split(";"):
            m = _QVALUE_RE.match(param)
            if m:
                try:
                    q = float(m.group(1))
                except ValueError:
                    q = 0.0
        if name in ("gzip", "x-gzip"):
            return q > 0
        if name == "*":
            star = q > 0
    return bool(star)


class _BaseHandler(tornado.web.RequestHandler):
    """JSON errors, bearer tokens, CORS and access logging for ssepg routes."""

    allow = ALLOW_TOPIC

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

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    def _cors_headers(self) -> dict[str, str]:
        origins = self.config.cors_origins
        origin = self.request.headers.get("Origin")
        if not origins or not origin:
            return {}
        if origin in origins:
            return {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true",
                "Vary": "Origin",
            }
        if "*" in origins:
            return {"Access-Control-Allow-Origin": "*"}
        return {}

    def prepare(self) -> None:
        if len(self.request.uri or "") > MAX_URI_BYTES:
            raise ApiError(
                414,
                "uri too long",
                size=len(self.request.uri or ""),
                limit=MAX_URI_BYTES,
            )
        size = sum(len(k) + len(v) + 4 for k, v in self.request.headers.get_all())
        if size > MAX_HEADER_BYTES:
            raise ApiError(
                431, "request headers too large", size=size, limit=MAX_HEADER_BYTES
            )
        for name, value in self._cors_headers().items():
            if name == "Vary":
                self.add_header(name, value)
            else:
                self.set_header(name, value)

    def options(self, *args: str) -> None:
        self.set_header("Allow", self.allow)
        if self._cors_headers():
            self.set_header("Access-Control-Allow-Methods", self.allow)
            requested = self.request.headers.get("Access-Control-Request-Headers")
            self.set_header(
                "Access-Control-Allow-Headers",
                CORS_ALLOW_HEADERS if not requested else _merge_headers(requested),
            )
            self.set_header("Access-Control-Max-Age", str(CORS_MAX_AGE_S))
        self.set_status(204)

    def _method_not_allowed(self, *args: str) -> None:
        raise ApiError(405, "method not allowed", {"Allow": self.allow})

    head = put = delete = patch = _method_not_allowed

    def check_token(self, token: str | None, allow_query: bool = False) -> None:
        """Require ``Authorization: Bearer <token>`` (or, with *allow_query*,
        ``?access_token=``) when *token* is set; compared in constant time."""
        if token is None:
            return
        given = None
        header = self.request.headers.get("Authorization")
        if header is not None:
            m = _BEARER_RE.match(header)
            given = m.group(1) if m else None
        elif allow_query:
            given = self.get_query_argument("access_token", None)
        expected = token.encode("utf-8")
        if given is None or not hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), expected
        ):
            raise ApiError(
                401,
                "unauthorized",
                {
                    "WWW-Authenticate": 'Bearer realm="ssepg"',
                    "Cache-Control": "no-store",
                },
            )

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # send_error() cleared what prepare() set; without CORS headers a page
        # on another origin could not read why its request failed.
        for name, value in self._cors_headers().items():
            self.set_header(name, value)
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            body = exc.body
            for name, value in exc.headers.items():
                self.set_header(name, value)
        else:
            body = {"error": _STATUS_MESSAGES.get(status_code, "error")}
            if status_code == 405:
                self.set_header("Allow", self.allow)
        self.set_header("Content-Type", "application/json")
        self.finish(ujson.dumps(body, ensure_ascii=False, escape_forward_slashes=False))

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

    def write_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(ujson.dumps(body, ensure_ascii=False, escape_forward_slashes=False))


def _merge_headers(requested: str) -> str:
    names = [h.strip() for h in CORS_ALLOW_HEADERS.split(",")]
    lowered = {n.lower() for n in names}
    for h in requested.split(","):
        h = h.strip()
        if h and h.lower() not in lowered and re.fullmatch(r"[A-Za-z0-9-]{1,64}", h):
            names.append(h)
            lowered.add(h.lower())
    return ", ".join(names)


class _BodyLimitMixin(_BaseHandler):
    """Reads the request body in chunks and answers 413 as soon as it passes
    ``max_body_bytes``, before a large body is buffered."""

    def prepare(self) -> None:
        super().prepare()
        self._chunks: list[bytes] = []
        self._body_size = 0
        self._too_large = False
        self._holding = False
        self._expected = -1
        if self.request.method != "POST":
            return
        length = self.request.headers.get("Content-Length")
        limit = self.config.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, "request body too large", size=int(length), limit=limit)
        self._expected = int(length) if length is not None and length.isdigit() else -1

    def data_received(self, chunk: bytes) -> None:
        if self._too_large:
            self._body_size += len(chunk)
            return
        self._body_size += len(chunk)
        if self._body_size > self.config.max_body_bytes:
            self._too_large = True
            self._chunks = []
            # Answer now; Tornado then closes the connection instead of
            # reading the rest (a chunked body past Tornado's own limit
            # would otherwise end in a bare 400 without a JSON body).
            limit = self.config.max_body_bytes
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

    def _stop_holding(self) -> None:
        if getattr(self, "_holding", False):
            self._holding = False
            self.service.dispatcher.release()

    def on_finish(self) -> None:
        self._stop_holding()
        super().on_finish()

    def on_connection_close(self) -> None:
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

    allow = ALLOW_TOPIC

    def get(self, path: str) -> None:
        topics = parse_topics(path)
        self._topic_label = ",".join(topics)
        self.check_token(self.config.listen_token, allow_query=True)
        service = self.service
        if service.is_draining or (
            service.dispatcher.stream_count >= self.config.max_subscribers
        ):
            self._busy()
            return
        last_event_id = self.request.headers.get("Last-Event-ID")
        if last_event_id is None:
            # Decoded leniently: an id that is not UTF-8 is merely unknown,
            # answered with ssepg-reset like any other, not with a 400.
            raw_ids = self.request.query_arguments.get("last_event_id")
            if raw_ids:
                last_event_id = raw_ids[-1].decode("utf-8", "replace")
        is_gzip = accepts_gzip(self.request.headers.get("Accept-Encoding"))
        head = self._stream_head(is_gzip)
        stream = self.detach()
        try:
            sock = stream.socket.dup()
        except (OSError, AttributeError):
            stream.close()
            return
        stream.close()
        sock.setblocking(False)
        service.dispatcher.add_stream(
            sock,
            topics,
            head=head,
            is_gzip=is_gzip,
            last_event_id=last_event_id,
        )

    def _stream_head(self, is_gzip: bool) -> bytes:
        lines = [
            "HTTP/1.1 200 OK",
            "Content-Type: text/event-stream; charset=utf-8",
            "Cache-Control: no-cache, no-transform",
            "X-Accel-Buffering: no",
            "Vary: Accept-Encoding",
            "Connection: close",
        ]
        if is_gzip:
            lines.append("Content-Encoding: gzip")
        for name, value in self._cors_headers().items():
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _busy(self) -> None:
        # A native EventSource never retries after a non-200 answer, so a
        # full or draining server answers 200 with a jittered retry hint.
        retry_ms = random.randint(2000, 10000)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache, no-transform")
        self.set_header("Retry-After", str(max(1, retry_ms // 1000)))
        self.set_header("Connection", "close")
        finished = self.finish(b"retry: %d\n\n: server busy\n\n" % retry_ms)
        # Tornado keeps an HTTP/1.1 connection open unless the request asked
        # otherwise; the busy answer closes it, as its header says.
        stream = getattr(self.request.connection, "stream", None)
        if stream is not None:
            finished.add_done_callback(lambda _: stream.close())

    async def post(self, path: str) -> None:
        topics = parse_topics(path)
        self._topic_label = ",".join(topics)
        if len(topics) != 1:
            raise ApiError(400, "publish to one topic at a time")
        self.check_token(self.config.publish_token)
        body = self.take_body()
        data, event = parse_publish_body(body)
        topic = topics[0]
        try:
            event_id = await self.service.publish_raw(topic, data, event)
        except PayloadTooLarge as exc:
            raise ApiError(
                413, "event too large", size=exc.size, limit=exc.limit
            ) from None
        except BrokerError as exc:
            raise ApiError(
                503, _unavailable_message(exc), {"Retry-After": "1"}
            ) from None
        except PublishError as exc:
            raise ApiError(400, str(exc)) from None
        self.set_header("Content-Type", "application/json")
        self.finish(
            b'{"topic":"'
            + topic.encode("ascii")
            + b'","id":"'
            + event_id.encode("ascii")
            + b'","data":'
            + data
            + b"}"
        )


def _unavailable_message(exc: BrokerError) -> str:
    text = str(exc)
    return text if text.islower() or not text else text[0].lower() + text[1:]


@tornado.web.stream_request_body
class BatchPublishHandler(_BodyLimitMixin):
    """``POST {"events": [{"topic": .., "data": .., "event": ..}, ...]}``
    publishes up to 1,000 events; the answer lists one result per item, in
    order: ``{"topic", "id"}`` or ``{"error", "status"}``."""

    allow = ALLOW_BATCH

    def get(self) -> None:
        self._method_not_allowed()

    async def post(self) -> None:
        self.check_token(self.config.publish_token)
        body = self.take_body()
        try:
            spans = object_spans(body)
        except JSONError as exc:
            raise ApiError(400, str(exc)) from None
        events = spans.get("events")
        if events is None:
            raise ApiError(400, "missing events")
        try:
            items = array_spans(body, *events)
        except JSONError:
            raise ApiError(400, "events must be an array") from None
        if len(items) > MAX_BATCH_ITEMS:
            raise ApiError(
                413, "too many events", size=len(items), limit=MAX_BATCH_ITEMS
            )
        results: list[dict[str, Any] | None] = [None] * len(items)
        pending: list[tuple[int, str, asyncio.Future[str]]] = []
        for index, (start, end) in enumerate(items):
            try:
                topic, data, event = _parse_batch_item(body, start, end)
            except ApiError as exc:
                results[index] = {**exc.body, "status": exc.status_code}
                continue
            pending.append(
                (
                    index,
                    topic,
                    asyncio.ensure_future(self.service.publish_raw(topic, data, event)),
                )
            )
        if pending:
            await asyncio.wait([fut for _, _, fut in pending])
        for index, topic, fut in pending:
            failure = fut.exception()
            if failure is None:
                results[index] = {"topic": topic, "id": fut.result()}
            elif isinstance(failure, PayloadTooLarge):
                results[index] = {
                    "error": "event too large",
                    "status": 413,
                    "size": failure.size,
                    "limit": failure.limit,
                }
            elif isinstance(failure, BrokerError):
                results[index] = {"error": _unavailable_message(failure), "status": 503}
            elif isinstance(failure, PublishError):
                results[index] = {"error": str(failure), "status": 400}
            else:
                raise failure
        self._topic_label = f"{len(items)} events"
        self.write_json({"results": results})


def _parse_batch_item(body: bytes, start: int, end: int) -> tuple[str, bytes, str]:
    try:
        spans = object_spans(body, start, end)
    except JSONError:
        raise ApiError(400, "event must be an object") from None
    topic_span = spans.get("topic")
    if topic_span is None or not span_is_string(body, *topic_span):
        raise ApiError(400, "missing topic")
    try:
        topic = normalize_topic(decode_string(body, *topic_span))
    except InvalidTopic:
        raise ApiError(400, "invalid topic") from None
    data, event = parse_publish_body(body, start, end)
    return topic, data, event


class HealthHandler(_BaseHandler):
    """The health report; 503 while the listener is down or draining."""

    allow = ALLOW_READ

    def get(self) -> None:
        limit_arg = self.get_query_argument("limit", None)
        limit = None
        if limit_arg is not None:
            if not limit_arg.isdigit() or len(limit_arg) > 9:
                raise ApiError(400, "limit must be a non-negative integer")
            limit = int(limit_arg)
        report = self.service.health(limit=limit)
        self.write_json(report, 200 if report["status"] == "ok" else 503)

    post = _BaseHandler._method_not_allowed


class MetricsHandler(_BaseHandler):
    """Prometheus text exposition of the service's figures."""

    allow = ALLOW_READ

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


__all__ += ["http_log"]
