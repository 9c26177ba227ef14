"""What each route does, apart from the HTTP server carrying it.

Both HTTP servers use these functions: the lean front of ``python -m ssepg``
(`ssepg.front`) and the Tornado handlers that mount into an existing
application (`ssepg.handlers`). A request is described by a small view (its
path parameters, a few headers, the raw query) and every answer is bytes, so
neither server has logic of its own.
"""

from __future__ import annotations

import asyncio
import hmac
import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import tornado.web
import ujson
from tornado.escape import parse_qs_bytes

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
from .topics import normalize_topic

if TYPE_CHECKING:
    from .service import Service

__all__ = [
    "ApiError",
    "parse_topics",
    "parse_publish_body",
    "accepts_gzip",
    "check_publisher",
    "check_token",
    "cors_headers",
    "preflight_headers",
    "error_answer",
    "stream_head",
    "busy_answer",
    "last_event_id",
    "publish",
    "publish_batch",
    "health_answer",
]

MAX_TOPICS_PER_STREAM = 16
MAX_BATCH_ITEMS = 1000
# Header blocks above this get 431.
MAX_HEADER_BYTES = 16 * 1024
# Request targets (path and query) above this get 414; a resume id in the
# query (last_event_id) may itself be several KiB of junk.
MAX_URI_BYTES = 16 * 1024
ALLOW_TOPIC = "GET, POST, OPTIONS"
ALLOW_BATCH = "POST, OPTIONS"
ALLOW_READ = "GET, OPTIONS"
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID, Cache-Control"
CORS_MAX_AGE_S = 600

STATUS_MESSAGES = {
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
_HEADER_NAME_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
_CHALLENGE = {
    "WWW-Authenticate": 'Bearer realm="ssepg"',
    "Cache-Control": "no-store",
}

Headers = dict[str, str]


class ApiError(tornado.web.HTTPError):
    """An HTTP error with a JSON body: ``{"error": message, **extra}``.

    A `tornado.web.HTTPError`, so Tornado handlers may simply raise it.
    """

    def __init__(
        self,
        status: int,
        message: str,
        headers: Headers | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status)
        self.body = {"error": message, **extra}
        self.headers = headers or {}


def dumps(body: Any) -> bytes:
    """Compact JSON for answers."""
    return ujson.dumps(body, ensure_ascii=False, escape_forward_slashes=False).encode(
        "utf-8"
    )


def error_answer(
    exc: BaseException | None, status: int, allow: str
) -> tuple[Headers, bytes]:
    """Headers and JSON body answering *exc* (an `ApiError`, or anything
    else with the default message of *status*)."""
    if isinstance(exc, ApiError):
        return dict(exc.headers), dumps(exc.body)
    headers = {"Allow": allow} if status == 405 else {}
    return headers, dumps({"error": STATUS_MESSAGES.get(status, "error")})


# Parsing ----------------------------------------------------------------------


def parse_topics(path: str) -> tuple[str, ...]:
    """Topic ids of a URL path segment, ``a`` or ``a,b,c`` (at most 16),
    lower-cased, duplicates removed, order kept.

    :raises ApiError: 400 on an invalid id or too many topics.
    """
    topics: list[str] = []
    # The request target's size limit bounds the number of names.
    for name in path.split(","):
        try:
            topic = normalize_topic(name)
        except InvalidTopic:
            raise ApiError(400, "invalid topic") from None
        if topic not in topics:
            topics.append(topic)
            if len(topics) > MAX_TOPICS_PER_STREAM:
                raise ApiError(400, f"too many topics (limit {MAX_TOPICS_PER_STREAM})")
    return tuple(topics)


def parse_publish_body(body: bytes, start: int = 0, end: int = -1) -> tuple[bytes, str]:
    """``(compact data, event name)`` of a publish body ``{"data": .., "event": ..}``.

    :raises ApiError: 400 with the reason.
    """
    try:
        spans = object_spans(body, start, end)
    except JSONError as exc:
        raise ApiError(400, str(exc)) from None
    return _publish_fields(body, spans)


def _publish_fields(
    body: bytes, spans: dict[str, tuple[int, int]]
) -> tuple[bytes, str]:
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


def _parse_batch_item(body: bytes, start: int, end: int) -> tuple[str, bytes, str]:
    try:
        spans = object_spans(body, start, end)
    except JSONError:
        raise ApiError(400, "event must be an object") from None
    topic_span = spans.get("topic")
    if topic_span is None:
        raise ApiError(400, "missing topic")
    if not span_is_string(body, *topic_span):
        raise ApiError(400, "topic must be a string")
    try:
        topic = normalize_topic(decode_string(body, *topic_span))
    except InvalidTopic:
        raise ApiError(400, "invalid topic") from None
    data, event = _publish_fields(body, spans)
    return topic, data, event


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


def query_values(query: str, name: str) -> list[bytes]:
    """Raw (percent-decoded, not yet UTF-8-decoded) values of *name* in a
    query string."""
    if name not in query:
        return []
    return parse_qs_bytes(query, keep_blank_values=True).get(name, [])


def last_event_id(header: str | None, query: str) -> str | None:
    """The resume id: the ``Last-Event-ID`` header, else the
    ``last_event_id`` query parameter. Decoded leniently: an id that is not
    UTF-8 is merely unknown (answered with ``ssepg-reset``), not an error.
    An empty id is no id, as for a browser, which never sends one."""
    if header:
        return header
    values = query_values(query, "last_event_id")
    if values and values[-1]:
        return values[-1].decode("utf-8", "replace")
    return None


# Access -----------------------------------------------------------------------


def check_token(
    token: str | None, authorization: str | None, query: str | None = None
) -> None:
    """Require the bearer *token* (when one is configured), from the
    ``Authorization`` header or, when *query* is given, an ``access_token``
    query parameter; compared in constant time.

    :raises ApiError: 401 with ``WWW-Authenticate: Bearer``.
    """
    if token is None:
        return
    given: bytes | None = None
    if authorization is not None:
        m = _BEARER_RE.match(authorization)
        given = m.group(1).encode("utf-8", "surrogateescape") if m else None
    elif query is not None:
        values = query_values(query, "access_token")
        given = values[-1] if values else None
    if given is None or not hmac.compare_digest(given, token.encode("utf-8")):
        raise ApiError(401, "unauthorized", dict(_CHALLENGE))


def cors_headers(origins: tuple[str, ...], origin: str | None) -> Headers:
    """CORS headers for a request from *origin*: the origin itself (with
    credentials) when listed, ``*`` (without) when allowed, else none."""
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


def preflight_headers(
    origins: tuple[str, ...], origin: str | None, allow: str, requested: str | None
) -> Headers:
    """Headers answering ``OPTIONS``: ``Allow``, and for an allowed origin
    the CORS preflight answer."""
    headers = {"Allow": allow}
    cors = cors_headers(origins, origin)
    if cors:
        headers.update(cors)
        headers["Access-Control-Allow-Methods"] = allow
        headers["Access-Control-Allow-Headers"] = (
            _merge_headers(requested) if requested else CORS_ALLOW_HEADERS
        )
        headers["Access-Control-Max-Age"] = str(CORS_MAX_AGE_S)
    return headers


def _merge_headers(requested: str) -> str:
    names = [h.strip() for h in CORS_ALLOW_HEADERS.split(",")]
    lowered = {n.lower() for n in names}
    for h in requested.split(","):
        h = h.strip()
        if h and h.lower() not in lowered and _HEADER_NAME_RE.fullmatch(h):
            names.append(h)
            lowered.add(h.lower())
    return ", ".join(names)


def check_request_size(uri: str, header_bytes: int) -> None:
    """:raises ApiError: 414 for a long request target, 431 for large headers."""
    if len(uri) > MAX_URI_BYTES:
        raise ApiError(414, "uri too long", size=len(uri), limit=MAX_URI_BYTES)
    if header_bytes > MAX_HEADER_BYTES:
        raise ApiError(
            431, "request headers too large", size=header_bytes, limit=MAX_HEADER_BYTES
        )


# Streams ----------------------------------------------------------------------


def stream_head(is_gzip: bool, cors: Headers) -> bytes:
    """The response head of an SSE stream; the body runs until the server
    closes the connection."""
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
    lines.extend(f"{name}: {value}" for name, value in cors.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def stream_is_refused(service: Service) -> bool:
    """True while new streams get the busy answer (draining, or full)."""
    return (
        service.is_draining
        or service.dispatcher.stream_count >= service.config.max_subscribers
    )


def busy_answer() -> tuple[Headers, bytes]:
    """The answer to a stream the server cannot take now: 200 with a
    jittered ``retry:`` hint, because a native EventSource never retries
    after a non-200 answer; the connection closes after it."""
    retry_ms = random.randint(2000, 10000)
    headers = {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache, no-transform",
        "Retry-After": str(max(1, retry_ms // 1000)),
        "Connection": "close",
    }
    return headers, b"retry: %d\n\n: server busy\n\n" % retry_ms


# Publishing -------------------------------------------------------------------


def _publish_failure(exc: BaseException) -> ApiError:
    if isinstance(exc, PayloadTooLarge):
        return ApiError(413, "event too large", size=exc.size, limit=exc.limit)
    if isinstance(exc, BrokerError):
        return ApiError(503, _lowercase_first(str(exc)), {"Retry-After": "1"})
    if isinstance(exc, PublishError):
        return ApiError(400, str(exc))
    raise exc


def _lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _publish_answer(topic: str, event_id: str, data: bytes) -> bytes:
    return (
        b'{"topic":"'
        + topic.encode("ascii")
        + b'","id":"'
        + event_id.encode("ascii")
        + b'","data":'
        + data
        + b"}"
    )


def check_publisher(service: Service, header: Callable[[str], str | None]) -> None:
    """Refuse a publish without the publish token (401), and one from a web
    page (it carries ``Origin``) whose body is not declared JSON (415).

    A page elsewhere can send a form or ``text/plain`` body to any server
    without asking first; a JSON one needs a CORS preflight, which only
    ``cors_origins`` pass. So a publish from a page of an origin not allowed
    never reaches the broker, token or not.
    """
    check_token(service.config.publish_token, header("authorization"))
    if header("origin") is None:
        return
    media = (header("content-type") or "").partition(";")[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/")
        and media.endswith("+json")
        and len(media) > len("application/+json")
    ):
        raise ApiError(415, "a publish from a web page must be application/json")


def publish(
    service: Service,
    path: str,
    body: bytes,
    header: Callable[[str], str | None],
    done: Callable[[bytes | ApiError], None],
) -> None:
    """``POST /topics/{path}/events``: check and publish, then call *done*
    with the answer body or an `ApiError` (at once when the broker takes the
    event synchronously, else when Postgres confirmed it). *header* looks up
    a request header by lower-case name.

    :raises ApiError: for a request refused before publishing.
    """
    topics = parse_topics(path)
    if len(topics) != 1:
        raise ApiError(400, "publish to one topic at a time")
    check_publisher(service, header)
    data, event = parse_publish_body(body)
    topic = topics[0]
    try:
        event_id, confirmed = service.submit_raw(topic, data, event)
    except PublishError as exc:
        raise _publish_failure(exc) from None
    if confirmed is None:
        done(_publish_answer(topic, event_id, data))
        return
    # The caller holds fan-outs back for this event (Dispatcher.hold): once
    # it is heard back they may go, without waiting for the confirmation.
    # Hearing it proves Postgres committed it, so the answer goes then too,
    # if it comes before the confirmation.
    dispatcher = service.dispatcher
    answered = False

    def answer(result: bytes | ApiError) -> None:
        nonlocal answered
        if not answered:
            answered = True
            dispatcher.settle(event_id)
            done(result)

    def settled(fut: asyncio.Future[None]) -> None:
        exc = fut.exception()
        answer(_publish_failure(exc) if exc else _publish_answer(topic, event_id, data))

    def heard() -> None:
        # Committed: should its connection fail now, it is not sent again.
        service.broker.heard_back(confirmed)
        answer(_publish_answer(topic, event_id, data))

    dispatcher.expect(event_id, heard)
    confirmed.add_done_callback(settled)


def publish_batch(
    service: Service,
    body: bytes,
    header: Callable[[str], str | None],
    done: Callable[[bytes | ApiError], None],
) -> int:
    """``POST /topics``: check and publish each item, then call *done* with
    ``{"results": [...]}`` (one result per item, in order). Returns the
    number of items. *header* as for `publish`.

    :raises ApiError: for a request refused as a whole.
    """
    check_publisher(service, header)
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
        raise ApiError(413, "too many events", size=len(items), limit=MAX_BATCH_ITEMS)
    results: list[dict[str, Any]] = [{}] * len(items)
    entries: list[tuple[str, bytes, str]] = []
    positions: list[int] = []
    for index, (start, end) in enumerate(items):
        try:
            entries.append(_parse_batch_item(body, start, end))
        except ApiError as exc:
            results[index] = {**exc.body, "status": exc.status_code}
            continue
        positions.append(index)
    try:
        ids, settled = service.submit_many(entries)
    except PublishError as exc:
        raise _publish_failure(exc) from None

    def answer(fut: asyncio.Future[list[BaseException | None]]) -> None:
        for position, (topic, _, _), event_id, outcome in zip(
            positions, entries, ids, fut.result(), strict=True
        ):
            if outcome is None:
                results[position] = {"topic": topic, "id": event_id}
            else:
                error = _publish_failure(outcome)
                results[position] = {**error.body, "status": error.status_code}
        done(dumps({"results": results}))

    settled.add_done_callback(answer)
    return len(items)


# Health -----------------------------------------------------------------------


def health_answer(service: Service, query: str) -> tuple[int, bytes]:
    """``GET /healthz[?limit=N]``: 200 when ok, 503 when degraded.

    :raises ApiError: 400 for a bad limit.
    """
    values = query_values(query, "limit")
    limit = None
    if values:
        raw = values[-1]
        if not raw.isdigit() or len(raw) > 9:
            raise ApiError(400, "limit must be an integer from 0 to 999999999")
        limit = int(raw)
    report = service.health(limit=limit)
    return (200 if report["status"] == "ok" else 503), dumps(report)
