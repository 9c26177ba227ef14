"""`Service`: a dispatcher, a broker and the HTTP routes that serve them."""

from __future__ import annotations

import asyncio
import os
import platform
import random
import socket
import time
from typing import Any

import psutil
import tornado
import tornado.httpserver
import tornado.netutil
import tornado.web

from ._fast import comment, is_event_name
from .broker import Broker, MemoryBroker, PostgresBroker, build_envelope
from .config import Config, format_bytes, redact_dsn
from .errors import BrokerError, ConfigError, PayloadTooLarge
from .front import Front
from .handlers import (
    BatchPublishHandler,
    HealthHandler,
    MetricsHandler,
    NotFoundHandler,
    TopicEventsHandler,
)
from .hub import Dispatcher, encode_data
from .log import broker_log, http_log, hub_log
from .metrics import Metrics
from .topics import normalize_topic

__all__ = ["Service", "make_app"]

# Header room Tornado reads before it drops a connection; the handlers answer
# 431 above their own, smaller limit (handlers.MAX_HEADER_BYTES).
TORNADO_HEADER_BYTES = 64 * 1024


class Service:
    """One ssepg instance: topics and subscribers (`Dispatcher`), a broker
    (Postgres with a DSN, in-process without) and Tornado routes.

    Create it with ``await Service.start(config)`` on the IOLoop that will
    run it, mount `routes` into an application (or call `listen`), and
    ``await service.close()`` to drain and release everything.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.dispatcher = Dispatcher(
            ring_capacity=config.ring_capacity,
            fanout_shards=config.fanout_shards,
            client_buffer=config.client_buffer,
            keep_alive=config.keep_alive,
            topic_idle_timeout=config.topic_idle_timeout,
        )
        self.instance_id = self.dispatcher.instance_id
        self.broker: Broker = MemoryBroker(self.dispatcher)
        self.is_draining = False
        self.is_closed = False
        self.started_at = time.time()
        self.metrics = Metrics(self)
        self._servers: list[tornado.httpserver.HTTPServer | Front] = []
        self._cleanup_handle: asyncio.TimerHandle | None = None
        self._under_pressure = False
        self._process = psutil.Process()

    @classmethod
    async def start(cls, config: Config | None = None) -> Service:
        """Create and start a service on the running IOLoop.

        Postgres being down does not fail the start: the service reports
        ``degraded`` and keeps reconnecting.

        :raises ConfigError: the health port cannot be bound.
        """
        service = cls(config if config is not None else Config.from_env())
        await service._start()
        return service

    async def _start(self) -> None:
        config = self.config
        if config.dsn:
            self.broker = PostgresBroker(
                config,
                self.dispatcher,
                self.metrics.listener_changed,
                self._record_publish,
            )
        await self.broker.start()
        if config.health_port is not None:
            front = Front(self, health_only=True)
            try:
                front.listen(config.health_port)
            except OSError as exc:
                await self.broker.close()
                raise ConfigError(
                    "health_port",
                    f"cannot listen on port {config.health_port}: {exc.strerror}",
                ) from exc
            self._servers.append(front)
        loop = asyncio.get_running_loop()
        self._cleanup_handle = loop.call_later(
            config.memory_cleanup_interval, self._cleanup
        )
        if self.broker.kind == "postgres":
            broker_log.info(
                "instance %s on Postgres %s (%d notify shards)",
                self.instance_id,
                redact_dsn(config.dsn),
                config.notify_shards,
            )
        else:
            broker_log.info(
                "instance %s on the in-process broker (no DSN: single instance)",
                self.instance_id,
            )
        http_log.info("%s", self.security_summary())

    def security_summary(self) -> str:
        """One line naming what is protected and each open surface."""
        c = self.config
        protected = []
        warnings = []
        if c.publish_token:
            protected.append("publish (bearer token)")
        else:
            warnings.append("WARNING publishing is open to anyone (no publish_token)")
        if c.listen_token:
            protected.append("subscribe (bearer token)")
        else:
            warnings.append("WARNING subscribing is open to anyone (no listen_token)")
        if c.health_port is not None:
            protected.append(f"health and metrics on separate port {c.health_port}")
        else:
            warnings.append("WARNING health and metrics are served on the public port")
        if not c.cors_origins:
            protected.append("no cross-origin access")
        elif "*" in c.cors_origins:
            warnings.append("WARNING any web origin may call the API (cors_origins=*)")
        text = "security: protected: " + (", ".join(protected) or "nothing")
        if warnings:
            text += "; " + "; ".join(warnings)
        return text

    # Routes ------------------------------------------------------------------

    def routes(
        self,
    ) -> list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]]:
        """Handler tuples for a `tornado.web.Application`: topic streams and
        publishing under ``base_path``, plus health and metrics unless they
        live on ``health_port``."""
        base = self.config.base_path
        kwargs = {"service": self}
        routes: list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]] = [
            (base + r"/([^/]*)/events", TopicEventsHandler, kwargs),
            (base, BatchPublishHandler, kwargs),
        ]
        if self.config.health_port is None:
            routes.extend(self.health_routes())
        return routes

    def health_routes(
        self,
    ) -> list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]]:
        kwargs = {"service": self}
        return [
            (self.config.healthz, HealthHandler, kwargs),
            ("/metrics", MetricsHandler, kwargs),
        ]

    def attach(self, app: tornado.web.Application) -> None:
        """Add `routes` to an existing application (matched for any host)."""
        app.add_handlers(r".*", self.routes())

    def listen(
        self,
        port: int,
        address: str = "",
        *,
        app: tornado.web.Application | None = None,
        reuse_port: bool = False,
        tornado_server: bool = False,
    ) -> Front | tornado.httpserver.HTTPServer:
        """Serve this service on *port* (0 picks a free one, see
        `bound_port`) until `close`.

        By default through `ssepg.front.Front`, which answers ssepg's routes
        itself and hands any other request to *app*, a Tornado application
        of your own (without one, those get a JSON 404). With
        *tornado_server*, Tornado's own HTTP server runs *app* (default:
        `make_app` of this service) with the Tornado handlers.

        :raises OSError: the port cannot be bound.
        """
        if not tornado_server:
            front = Front(self, app)
            front.listen(port, address, reuse_port)
            self._servers.append(front)
            return front
        if app is None:
            app = make_app(self)
        server = tornado.httpserver.HTTPServer(
            app,
            max_header_size=TORNADO_HEADER_BYTES,
            max_body_size=max(self.config.max_body_bytes * 4, 1 << 20),
            idle_connection_timeout=3600,
            body_timeout=60,
        )
        sockets = tornado.netutil.bind_sockets(
            port, address or None, reuse_port=reuse_port
        )
        server.add_sockets(sockets)
        self._servers.append(server)
        return server

    # Publishing --------------------------------------------------------------

    async def publish(self, topic: str, data: Any, event: str | None = None) -> str:
        """Publish *data* (any JSON-serialisable value but None) on *topic*
        to every instance; returns the event id.

        :raises InvalidTopic: bad topic id.
        :raises PayloadTooLarge: the envelope exceeds ``max_notify_bytes``.
        :raises BrokerError: not taken within ``publish_timeout``, or closing.
        :raises ValueError: *data* is None or holds NaN or infinity, bad event name.
        :raises TypeError: *data* holds a value JSON cannot represent.
        """
        raw = encode_data(data)
        if event is not None and not is_event_name(event):
            raise ValueError(f"invalid event name {event!r}")
        event_id, confirmed = self.submit_raw(
            normalize_topic(topic), raw, event or "message"
        )
        if confirmed is not None:
            await confirmed
        return event_id

    async def publish_raw(self, topic: str, data: bytes, event: str = "message") -> str:
        """Publish compact JSON *data* on a normalised *topic*; see `publish`."""
        event_id, confirmed = self.submit_raw(topic, data, event)
        if confirmed is not None:
            await confirmed
        return event_id

    def submit_raw(
        self, topic: str, data: bytes, event: str = "message"
    ) -> tuple[str, asyncio.Future[None] | None]:
        """Start publishing compact JSON *data* on a normalised *topic*, for
        callers that do not want a coroutine per event. Returns the event id
        and None when the broker took it at once, else a future that resolves
        (or fails with `BrokerError`) when it did.

        :raises PayloadTooLarge: the envelope exceeds ``max_notify_bytes``.
        :raises BrokerError: the service is closing.
        """
        if self.is_draining or self.is_closed:
            raise BrokerError("service is shutting down")
        event_id = self.dispatcher.next_id()
        envelope = build_envelope(topic, event_id, event, data)
        limit = self.config.max_notify_bytes
        if len(envelope) > limit:
            raise PayloadTooLarge("event too large", len(envelope), limit)
        confirmed = self.broker.submit(topic, event_id, event, data, envelope)
        if confirmed is None:
            # Taken at once (the in-process broker); an asynchronous broker
            # reports through _record_publish when Postgres took it.
            self._record_publish(topic, 0.0)
        return event_id, confirmed

    def submit_many(
        self, entries: list[tuple[str, bytes, str]]
    ) -> tuple[list[str | None], asyncio.Future[list[BaseException | None]]]:
        """Start publishing ``(topic, compact data, event)`` entries together
        (a batch request): one future for all of them instead of one each.

        Returns each entry's event id (None when refused at once) and a
        future of each entry's outcome, in order: None once the broker took
        it, else its exception (`PayloadTooLarge`, `BrokerError`, ...).

        :raises BrokerError: the service is closing.
        """
        if self.is_draining or self.is_closed:
            raise BrokerError("service is shutting down")
        limit = self.config.max_notify_bytes
        ids: list[str | None] = []
        outcomes: list[BaseException | None] = []
        sendable: list[tuple[str, str, str, bytes, bytes]] = []
        positions: list[int] = []
        for index, (topic, data, event) in enumerate(entries):
            event_id = self.dispatcher.next_id()
            envelope = build_envelope(topic, event_id, event, data)
            if len(envelope) > limit:
                ids.append(None)
                outcomes.append(
                    PayloadTooLarge("event too large", len(envelope), limit)
                )
                continue
            ids.append(event_id)
            outcomes.append(None)
            sendable.append((topic, event_id, event, data, envelope))
            positions.append(index)
        settled: asyncio.Future[list[BaseException | None]] = (
            asyncio.get_running_loop().create_future()
        )
        confirmed = self.broker.submit_many(sendable) if sendable else None
        if confirmed is None:
            for topic, *_ in sendable:
                self._record_publish(topic, 0.0)
            settled.set_result(outcomes)
            return ids, settled

        def taken(fut: asyncio.Future[list[BaseException | None]]) -> None:
            for position, outcome in zip(positions, fut.result(), strict=True):
                outcomes[position] = outcome
            settled.set_result(outcomes)

        confirmed.add_done_callback(taken)
        return ids, settled

    def _record_publish(self, topic: str, seconds: float) -> None:
        self.metrics.observe_publish(seconds)
        self.dispatcher.count_published(topic)

    # Health ------------------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        return self.broker.is_connected and not self.is_draining and not self.is_closed

    def health(self, limit: int | None = None) -> dict[str, Any]:
        """The health report of section 7 of the design."""
        broker = self.broker
        stats = self.dispatcher.stats(limit)
        try:
            rss = self._process.memory_info().rss
        except psutil.Error:
            rss = 0
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:
            tasks = 0
        report: dict[str, Any] = {
            "status": "ok" if self.is_healthy else "degraded",
            "now": round(time.time(), 3),
            "instance_id": self.instance_id,
            "broker": broker.kind,
            "python_version": platform.python_version(),
            "tornado_version": tornado.version,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "rss_bytes": rss,
            "tasks": tasks,
            "draining": self.is_draining,
            "last_notification_at": broker.last_notification_at,
            "pg_notification_queue_usage": broker.queue_usage,
            "listen_connected": broker.is_connected,
            "listen_error": broker.listen_error,
            "reconnect_attempts": broker.reconnect_attempts,
            "bad_envelopes": broker.bad_envelopes,
            "totals": stats["totals"],
            "topics": stats["topics"],
        }
        return report

    def metrics_text(self, accept: str | None = None) -> tuple[bytes, str]:
        """Prometheus exposition of the current figures."""
        return self.metrics.render(accept)

    # Memory ------------------------------------------------------------------

    def _cleanup(self) -> None:
        self._cleanup_handle = None
        if self.is_closed:
            return
        try:
            self.run_cleanup()
        except Exception:
            hub_log.error("memory cleanup failed; will retry", exc_info=True)
        self._cleanup_handle = asyncio.get_running_loop().call_later(
            self.config.memory_cleanup_interval, self._cleanup
        )

    def run_cleanup(self) -> dict[str, int]:
        """Remove idle topics and, above ``memory_pressure_threshold``, shrink
        replay windows (topics without subscribers first). Runs every
        ``memory_cleanup_interval``; returns what it did."""
        d = self.dispatcher
        done = {"removed_topics": 0, "freed_bytes": 0, "shrunk_topics": 0}
        removed, freed = d.remove_idle_topics()
        if removed:
            hub_log.info(
                "removed %d idle topics (no subscribers, no traffic for %gs), freed %s",
                removed,
                self.config.topic_idle_timeout,
                format_bytes(freed),
            )
            done["removed_topics"] = removed
            done["freed_bytes"] += freed
        rss = self._process.memory_info().rss
        threshold = self.config.memory_pressure_threshold
        if rss > threshold:
            shrunk, freed = d.shrink_windows(with_subscribers=False)
            which = "without subscribers"
            if not shrunk:
                shrunk, freed = d.shrink_windows(with_subscribers=True)
                which = "with subscribers"
            if shrunk:
                self._under_pressure = True
                hub_log.warning(
                    "memory pressure: RSS %s above %s; halved the replay windows of "
                    "%d topics %s, freed %s",
                    format_bytes(rss),
                    format_bytes(threshold),
                    shrunk,
                    which,
                    format_bytes(freed),
                )
                done["shrunk_topics"] = shrunk
                done["freed_bytes"] += freed
        elif self._under_pressure and rss < threshold * 0.8:
            restored = d.restore_windows()
            self._under_pressure = False
            hub_log.info(
                "memory pressure over: RSS %s; restored the replay windows of "
                "%d topics",
                format_bytes(rss),
                restored,
            )
        return done

    # Shutdown ----------------------------------------------------------------

    async def close(self, drain: float | None = None) -> None:
        """Drain and stop: health turns not-ready at once, new streams get the
        busy answer, publishes 503; open streams are told ``: server shutting
        down`` with a jittered ``retry:`` and closed spread over *drain*
        seconds (default ``graceful_drain``); then the broker closes.
        Idempotent."""
        if self.is_closed or self.is_draining:
            return
        self.is_draining = True
        drain = self.config.graceful_drain if drain is None else drain
        hub_log.info(
            "draining %d streams over %gs", self.dispatcher.stream_count, drain
        )
        streams = self.dispatcher.streams()
        random.shuffle(streams)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index, sub in enumerate(streams):
            due = started + drain * (index + 1) / max(1, len(streams))
            delay = due - loop.time()
            if delay > 0.005:
                await asyncio.sleep(delay)
            retry_ms = random.randint(1000, max(2000, int(drain * 1000) + 1000))
            goodbye = comment("server shutting down") + b"retry: %d\n\n" % retry_ms
            self.dispatcher.close_stream(sub, goodbye, "shutdown")
        for server in self._servers:
            if isinstance(server, Front):
                await server.stop()
            else:
                server.stop()
        totals = self.dispatcher.stats(0)["totals"]
        self.dispatcher.close()
        await self.broker.close()
        if self._cleanup_handle is not None:
            self._cleanup_handle.cancel()
        for server in self._servers:
            if isinstance(server, Front):
                await server.close()
            else:
                await server.close_all_connections()
        self._servers.clear()
        self.is_closed = True
        hub_log.info(
            "closed: %d published, %d broadcast, %d frames delivered, "
            "%d clients dropped",
            totals["published"],
            totals["broadcast"],
            totals["delivered_frames"],
            totals["dropped_clients"],
        )


def make_app(service: Service, **settings: Any) -> tornado.web.Application:
    """A Tornado application serving only *service*: its routes and a JSON
    404 for anything else."""
    settings.setdefault("default_handler_class", NotFoundHandler)
    settings.setdefault("default_handler_args", {"service": service})
    settings.setdefault("log_function", _no_log)
    return tornado.web.Application(service.routes(), **settings)


def _no_log(handler: tornado.web.RequestHandler) -> None:
    # ssepg's handlers write their own access lines (without query strings).
    pass


def bound_port(server: Front | tornado.httpserver.HTTPServer) -> int:
    """The TCP port *server* listens on (for servers started on port 0)."""
    if isinstance(server, Front):
        return server.port
    for sock in server._sockets.values():  # noqa: SLF001 - Tornado keeps no public accessor
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return int(sock.getsockname()[1])
    raise RuntimeError("server has no TCP socket")


__all__ += ["bound_port"]
