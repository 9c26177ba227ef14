"""Settings of a ssepg service and their validation.

Every field can be set in code, from the environment (``SSEPG_<FIELD>``, and
``DATABASE_URL`` for the DSN) and from the command line of ``python -m ssepg``
(``--field-name``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import resource
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil

from .errors import ConfigError

__all__ = ["Config", "redact_dsn", "format_bytes"]

log = logging.getLogger("ssepg.config")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Postgres refuses NOTIFY payloads of 8000 bytes and more.
PG_NOTIFY_LIMIT_BYTES = 7999

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": 1000, "kib": KiB,
    "m": MiB, "mb": 1000**2, "mib": MiB,
    "g": GiB, "gb": 1000**3, "gib": GiB,
}
_ORIGIN_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9a-fA-F:]+\]$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9_.~/-]*$")


def parse_duration(text: str) -> float:
    """``"15"``, ``"15s"``, ``"500ms"``, ``"2m"`` or ``"1h"`` in seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_size(text: str) -> int:
    """``"262144"``, ``"256KiB"``, ``"1MiB"``, ``"2GB"`` in bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _parse_optional_int(text: str) -> int | None:
    text = text.strip()
    return None if text.lower() in ("", "none", "off", "0") else int(text)


def _parse_optional_str(text: str) -> str | None:
    return text or None


def _parse_origins(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def format_bytes(n: float) -> str:
    """Human-readable size: ``1.5 MiB``."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def redact_dsn(dsn: str | None) -> str:
    """The DSN with any password replaced by ``***``, fit for logs."""
    if not dsn:
        return "none"
    if "://" in dsn:
        parts = urlsplit(dsn)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = f"{userinfo}@{host}"
        query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    return re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)


def _meta(
    help: str,
    parse: Callable[[str], Any],
    *,
    secret: bool = False,
) -> dict[str, Any]:
    return {"help": help, "parse": parse, "secret": secret}


@dataclass(frozen=True)
class Config:
    """Settings of one ssepg service.

    ``Config()`` holds fixed defaults; `Config.default` adapts some of them to
    the machine. Instances are immutable and validated on creation: an
    invalid value raises `ConfigError` naming the field. Use
    `dataclasses.replace` (or `Config.replace`) to derive a changed copy.
    """

    dsn: str | None = field(
        default=None,
        repr=False,
        metadata=_meta(
            "Postgres DSN; without one the service runs on an in-process broker",
            _parse_optional_str, secret=True,
        ),
    )
    base_path: str = field(
        default="/topics", metadata=_meta("URL prefix of the topic routes", str)
    )
    healthz: str = field(
        default="/healthz", metadata=_meta("URL path of the health report", str)
    )
    health_port: int | None = field(
        default=None,
        metadata=_meta(
            "serve health and metrics on this port only (none: on the main port)",
            _parse_optional_int,
        ),
    )
    keep_alive: float = field(
        default=15.0,
        metadata=_meta("seconds between heartbeat comments", parse_duration),
    )
    notify_shards: int = field(
        default=8,
        metadata=_meta(
            "Postgres channels topic_broadcast_0..N-1; every instance on one "
            "database must use the same number", int,
        ),
    )
    fanout_shards: int = field(
        default=4,
        metadata=_meta("fan-out queues on the IOLoop (fairness between topics)", int),
    )
    ring_capacity: int = field(
        default=1024,
        metadata=_meta(
            "events kept per topic for replay (a power of two)", int
        ),
    )
    client_buffer: int = field(
        default=1 * MiB,
        metadata=_meta(
            "unsent bytes allowed per subscriber before it is dropped", parse_size
        ),
    )
    cors_origins: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "comma-separated origins allowed by CORS, or *", _parse_origins
        ),
    )
    max_notify_bytes: int = field(
        default=7900,
        metadata=_meta(
            "largest Postgres envelope in UTF-8 bytes (Postgres refuses 8000)",
            parse_size,
        ),
    )
    max_body_bytes: int = field(
        default=256 * KiB,
        metadata=_meta("largest publish request body", parse_size),
    )
    max_subscribers: int = field(
        default=10_000,
        metadata=_meta("open streams allowed; more get a busy answer", int),
    )
    publish_token: str | None = field(
        default=None,
        repr=False,
        metadata=_meta(
            "bearer token required to publish", _parse_optional_str, secret=True
        ),
    )
    listen_token: str | None = field(
        default=None,
        repr=False,
        metadata=_meta(
            "bearer token required to subscribe", _parse_optional_str, secret=True
        ),
    )
    publish_timeout: float = field(
        default=5.0,
        metadata=_meta(
            "seconds a publish may wait for the broker before 503", parse_duration
        ),
    )
    publish_retries: int = field(
        default=2,
        metadata=_meta(
            "times a publish is retried on a new connection after a lost one", int
        ),
    )
    graceful_drain: float = field(
        default=5.0,
        metadata=_meta(
            "seconds over which open streams are closed at shutdown", parse_duration
        ),
    )
    queue_poll_interval: float = field(
        default=10.0,
        metadata=_meta(
            "seconds between pg_notification_queue_usage() polls", parse_duration
        ),
    )
    queue_warn_threshold: float = field(
        default=0.5,
        metadata=_meta(
            "notification queue usage (0..1) above which a warning is logged",
            float,
        ),
    )
    memory_cleanup_interval: float = field(
        default=60.0,
        metadata=_meta(
            "seconds between idle-topic and memory-pressure checks", parse_duration
        ),
    )
    topic_idle_timeout: float = field(
        default=300.0,
        metadata=_meta(
            "seconds without subscribers and traffic before a topic is removed",
            parse_duration,
        ),
    )
    memory_pressure_threshold: int = field(
        default=1 * GiB,
        metadata=_meta(
            "process RSS above which replay windows of topics without "
            "subscribers shrink", parse_size,
        ),
    )

    def __post_init__(self) -> None:
        self._validate()

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={'***' if f.metadata['secret'] and getattr(self, f.name) else getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"Config({shown})"

    def replace(self, **changes: Any) -> Config:
        """A copy with *changes* applied and validated."""
        return dataclasses.replace(self, **changes)

    def _validate(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ConfigError(name, f"{message}, got {getattr(self, name)!r}")

        def check_type(name: str, kinds: tuple[type, ...], optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, kinds):
                names = " or ".join(k.__name__ for k in kinds)
                fail(name, f"must be {names}" + (" or None" if optional else ""))

        for name in ("dsn", "publish_token", "listen_token"):
            check_type(name, (str,), optional=True)
        for name in ("base_path", "healthz"):
            check_type(name, (str,))
            value = getattr(self, name)
            if not _PATH_RE.match(value) or "//" in value or (
                len(value) > 1 and value.endswith("/")
            ):
                fail(name, "must be an absolute URL path without a trailing slash")
        if self.base_path == "/":
            fail("base_path", "must not be the root path")
        if self.healthz == self.base_path or self.healthz.startswith(self.base_path + "/"):
            fail("healthz", "must not lie under base_path")
        check_type("health_port", (int,), optional=True)
        if self.health_port is not None and not 1 <= self.health_port <= 65535:
            fail("health_port", "must be a TCP port (1-65535)")
        for name in (
            "keep_alive", "publish_timeout", "graceful_drain", "queue_poll_interval",
            "memory_cleanup_interval", "topic_idle_timeout", "queue_warn_threshold",
        ):
            check_type(name, (int, float))
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                fail(name, "must be a finite number >= 0")
        for name in (
            "keep_alive", "publish_timeout", "queue_poll_interval",
            "memory_cleanup_interval", "topic_idle_timeout",
        ):
            if getattr(self, name) <= 0:
                fail(name, "must be above 0")
        if not 0 < self.queue_warn_threshold <= 1:
            fail("queue_warn_threshold", "must be above 0 and at most 1")
        for name in (
            "notify_shards", "fanout_shards", "ring_capacity", "client_buffer",
            "max_notify_bytes", "max_body_bytes", "max_subscribers", "publish_retries",
            "memory_pressure_threshold",
        ):
            check_type(name, (int,))
        if not 1 <= self.notify_shards <= 1024:
            fail("notify_shards", "must be between 1 and 1024")
        if not 1 <= self.fanout_shards <= 1024:
            fail("fanout_shards", "must be between 1 and 1024")
        rc = self.ring_capacity
        if rc < 1 or rc > 1 << 20 or rc & (rc - 1):
            fail("ring_capacity", "must be a power of two between 1 and 1048576")
        if self.client_buffer < 4 * KiB:
            fail("client_buffer", "must be at least 4 KiB")
        if not 256 <= self.max_notify_bytes <= PG_NOTIFY_LIMIT_BYTES:
            fail("max_notify_bytes", f"must be between 256 and {PG_NOTIFY_LIMIT_BYTES}")
        if self.max_body_bytes < 1024:
            fail("max_body_bytes", "must be at least 1024")
        if self.max_subscribers < 0:
            fail("max_subscribers", "must be >= 0")
        if not 0 <= self.publish_retries <= 100:
            fail("publish_retries", "must be between 0 and 100")
        if self.memory_pressure_threshold < 16 * MiB:
            fail("memory_pressure_threshold", "must be at least 16 MiB")
        if not isinstance(self.cors_origins, tuple) or not all(
            isinstance(o, str) for o in self.cors_origins
        ):
            fail("cors_origins", "must be a tuple of origins")
        for origin in self.cors_origins:
            if origin != "*" and not _ORIGIN_RE.match(origin):
                fail("cors_origins", f"{origin!r} is not '*' or scheme://host[:port]")
        for name in ("publish_token", "listen_token"):
            value = getattr(self, name)
            if value is not None and (not value or any(c.isspace() for c in value)):
                raise ConfigError(name, "must be a non-empty string without spaces")
        if self.dsn is not None and not self.dsn.strip():
            raise ConfigError("dsn", "must not be blank")

    @classmethod
    def default(cls, **overrides: Any) -> Config:
        """Defaults fitted to this machine's cores and memory (cgroup limits
        respected), logged in two lines; *overrides* win."""
        cores, memory, source = detect_resources()
        chosen = {
            "fanout_shards": max(4, min(64, 4 * cores)),
            "ring_capacity": 1024 if memory >= 4 * GiB else 512 if memory >= GiB else 256,
            "client_buffer": (
                1 * MiB if memory >= 8 * GiB else 512 * KiB if memory >= 2 * GiB else 256 * KiB
            ),
            "memory_pressure_threshold": max(64 * MiB, int(memory * 0.6)),
            "max_subscribers": _default_max_subscribers(memory),
        }
        log.info(
            "detected %d cores and %s of memory (%s)", cores, format_bytes(memory), source
        )
        log.info(
            "chose fanout_shards=%d ring_capacity=%d client_buffer=%s "
            "memory_pressure_threshold=%s max_subscribers=%d notify_shards=%d",
            chosen["fanout_shards"], chosen["ring_capacity"],
            format_bytes(chosen["client_buffer"]),
            format_bytes(chosen["memory_pressure_threshold"]),
            chosen["max_subscribers"], overrides.get("notify_shards", 8),
        )
        chosen.update(overrides)
        return cls(**chosen)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, base: Config | None = None
    ) -> Config:
        """*base* (or `Config.default`) with every ``SSEPG_<FIELD>`` variable
        and ``DATABASE_URL`` of *environ* applied."""
        environ = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        if environ.get("DATABASE_URL"):
            changes["dsn"] = environ["DATABASE_URL"]
        for f in fields(cls):
            key = "SSEPG_" + f.name.upper()
            if key in environ:
                changes[f.name] = _parse_field(f, environ[key], key)
        if base is None:
            return cls.default(**changes)
        return base.replace(**changes)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one ``--field-name`` option per field to *parser*."""
        group = parser.add_argument_group("service settings")
        for f in fields(cls):
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                default=None,
                metavar=f.name.upper(),
                help=f.metadata["help"],
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, base: Config | None = None) -> Config:
        """*base* (or `Config.from_env`) with every option given on the
        command line applied."""
        base = cls.from_env() if base is None else base
        changes = {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                changes[f.name] = _parse_field(f, value, "--" + f.name.replace("_", "-"))
        return base.replace(**changes)


def _parse_field(f: dataclasses.Field[Any], text: str, source: str) -> Any:
    try:
        return f.metadata["parse"](text)
    except ValueError as exc:
        shown = "***" if f.metadata["secret"] else repr(text)
        raise ConfigError(f.name, f"cannot parse {shown} from {source}") from exc


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.readline().strip()
    except OSError:
        return None


def detect_resources() -> tuple[int, int, str]:
    """Usable cores and memory bytes, with a word on where the limit came
    from. cgroup v2 and v1 limits win over what the host has."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        psutil.cpu_count() or 1
    )
    memory = psutil.virtual_memory().total
    notes = []
    quota = _read_first_line("/sys/fs/cgroup/cpu.max")
    if quota and not quota.startswith("max"):
        q, period = quota.split()[:2]
        cores = max(1, min(cores, math.ceil(int(q) / int(period))))
        notes.append("cgroup cpu quota")
    else:
        q1 = _read_first_line("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        p1 = _read_first_line("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        if q1 and p1 and int(q1) > 0:
            cores = max(1, min(cores, math.ceil(int(q1) / int(p1))))
            notes.append("cgroup cpu quota")
    limit = _read_first_line("/sys/fs/cgroup/memory.max")
    if limit is None:
        limit = _read_first_line("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    if limit and limit.isdigit() and int(limit) < memory:
        memory = int(limit)
        notes.append("cgroup memory limit")
    return cores, memory, ", ".join(notes) or "no cgroup limits"


def _default_max_subscribers(memory: int) -> int:
    # Each stream takes a file descriptor and, in the kernel, socket buffers
    # that may grow to a few hundred KiB for a client that reads slowly.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd_limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    by_memory = memory // (256 * KiB)
    return int(max(100, min(fd_limit - 256, by_memory)))


def config_fields() -> Sequence[dataclasses.Field[Any]]:
    """The fields of `Config`, in declaration order."""
    return fields(Config)
