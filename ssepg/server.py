"""The ssepg server: ``python -m ssepg`` and ``python examples/server.py``.

Every `Config` field is a ``--flag`` and an ``SSEPG_<FIELD>`` variable;
``--port`` (``SSEPG_PORT``, default 8080), ``--host`` (``SSEPG_HOST``) and
``--processes`` (``SSEPG_PROCESSES``) belong to the server itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import tornado.web

from .config import Config
from .errors import ConfigError
from .handlers import NotFoundHandler
from .log import access_log, http_log
from .service import Service, bound_port

__all__ = ["main", "serve", "build_parser"]

DEFAULT_PORT = 8080
LOOPS = ("auto", "uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")
RouteFactory = Callable[[Service], list[Any]]


def _tcp_port(text: str) -> int:
    # 0 takes any free port (the log names the one bound).
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0-65535), got {text!r}")
    return port


def _count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def build_parser(prog: str = "ssepg") -> argparse.ArgumentParser:
    """The command line: server options and one option per `Config` field."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve Server-Sent Events by topic; with a DSN, across every "
        "instance on the same Postgres database.",
    )
    env = os.environ
    parser.add_argument(
        "--port",
        type=_tcp_port,
        default=env.get("SSEPG_PORT", str(DEFAULT_PORT)),
        help="TCP port to serve on (SSEPG_PORT, default 8080)",
    )
    parser.add_argument(
        "--host",
        default=env.get("SSEPG_HOST", ""),
        help="address to bind (SSEPG_HOST, default all interfaces)",
    )
    parser.add_argument(
        "--processes",
        type=_count,
        default=env.get("SSEPG_PROCESSES", "1"),
        help="instances sharing the port via SO_REUSEPORT; needs a DSN above 1 "
        "(SSEPG_PROCESSES)",
    )
    parser.add_argument(
        "--loop",
        default=env.get("SSEPG_LOOP", "auto"),
        choices=LOOPS,
        help="event loop: uvloop when installed (auto), or asyncio's own "
        "(SSEPG_LOOP, default auto)",
    )
    parser.add_argument(
        "--log-level",
        default=env.get("SSEPG_LOG_LEVEL", "info"),
        choices=LOG_LEVELS,
        help="logging level (SSEPG_LOG_LEVEL, default info)",
    )
    Config.add_arguments(parser)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "ssepg",
    extra_routes: RouteFactory | None = None,
) -> int:
    """Run a server until SIGTERM or SIGINT, then drain; returns the exit
    status. *extra_routes* adds handlers (the example's live page)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    # argparse checks choices on the command line only, not on defaults
    # taken from the environment.
    for name, value, choices in (
        ("SSEPG_LOG_LEVEL", args.log_level, LOG_LEVELS),
        ("SSEPG_LOOP", args.loop, LOOPS),
    ):
        if value not in choices:
            parser.error(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = Config.from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.processes > 1 and args.port == 0:
        parser.error("--processes above 1 needs a fixed --port to share")
    if args.processes > 1 and not config.dsn:
        parser.error(
            "--processes above 1 needs a DSN: instances share events only "
            "through Postgres"
        )
    _raise_fd_limit()
    if args.loop == "uvloop" and _uvloop() is None:
        parser.error("--loop uvloop: uvloop is not installed")
    run = functools.partial(
        _run_one,
        config,
        args.host,
        args.port,
        loop=args.loop,
        extra_routes=extra_routes,
    )
    if args.processes > 1:
        return _run_processes(args.processes, args.port, run)
    return run(reuse_port=False)


def _uvloop() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def _run_one(
    config: Config,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    loop: str = "auto",
    extra_routes: RouteFactory | None = None,
) -> int:
    main = serve(config, host, port, reuse_port=reuse_port, extra_routes=extra_routes)
    uvloop = _uvloop() if loop != "asyncio" else None
    try:
        if uvloop is not None:
            uvloop.run(main)
        else:
            asyncio.run(main)
    except ConfigError as exc:
        http_log.error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        http_log.error("cannot start: %s", exc)
        return 1
    return 0


async def serve(
    config: Config,
    host: str = "",
    port: int = DEFAULT_PORT,
    *,
    reuse_port: bool = False,
    extra_routes: RouteFactory | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Start a service on *host*:*port* and serve until *stop* is set (or
    SIGTERM/SIGINT arrives), then drain and close."""
    service = await Service.start(config)
    # Everything made so far (modules, the service) lives as long as the
    # process: out of the collector's way, full collections stay short.
    gc.freeze()
    try:
        routes = list(extra_routes(service)) if extra_routes else []
        # The front answers ssepg's own routes; an application is only needed
        # for the rest (the example page).
        app = None
        if routes:
            app = tornado.web.Application(
                routes,
                default_handler_class=NotFoundHandler,
                default_handler_args={"service": service},
                log_function=_log_request,
            )
        server = service.listen(port, host, app=app, reuse_port=reuse_port)
    except BaseException:
        await service.close(drain=0)
        raise
    http_log.info(
        "listening on http://%s:%d (pid %d, %s loop)",
        f"[{host}]" if ":" in host else host or "0.0.0.0",
        bound_port(server),
        os.getpid(),
        type(asyncio.get_running_loop()).__module__.split(".")[0],
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        http_log.info("shutting down")
        await service.close()


def _log_request(handler: tornado.web.RequestHandler) -> None:
    # The path only: query strings never reach the logs.
    request = handler.request
    access_log.info(
        "%s %s %d %.3fs",
        request.method,
        request.path,
        handler.get_status(),
        request.request_time(),
    )


def _raise_fd_limit() -> None:
    # Every stream is a file descriptor; the default soft limit (often 1024)
    # is far below what one process can serve.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _run_processes(count: int, port: int, run: Callable[..., int]) -> int:
    """Fork *count* instances sharing the port with SO_REUSEPORT; the parent
    forwards SIGTERM/SIGINT, restarts a child that dies unexpectedly, and
    exits when all children have."""
    children: dict[int, int] = {}
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os._exit(run(reuse_port=True))
        children[pid] = index

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(count):
        spawn(index)
    http_log.info("started %d processes on port %d", count, port)
    status = 0
    restarts: list[float] = []
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in children:
            continue
        index = children.pop(pid)
        exit_code = os.waitstatus_to_exitcode(code)
        if stopping:
            continue
        if exit_code != 0:
            status = 1
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if exit_code == 2 or len(restarts) > 5 * count:
            http_log.error("process %d exited with %d; not restarting", pid, exit_code)
            forward(signal.SIGTERM, None)
            continue
        http_log.warning(
            "process %d exited with %d; starting a new one", pid, exit_code
        )
        spawn(index)
    return status


def page_routes(service: Service, static_path: str) -> list[Any]:
    """Routes serving the live demo page from *static_path* at ``/``."""
    return [
        (
            r"/()",
            tornado.web.StaticFileHandler,
            {"path": static_path, "default_filename": "index.html"},
        ),
    ]
