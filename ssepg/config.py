"""Settings of a ssepg service and their validation.

Every field can be set in code, from the environment (``SSEPG_<FIELD>``, and
``DATABASE_URL`` for the DSN) and from the command line of ``python -m ssepg``
(``--field-name``). `Config.default` fits a few of them to the machine.
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

__all__ = [
    "Config",
    "config_fields",
    "detect_resources",
    "env_name",
    "flag_name",
    "format_bytes",
    "parse_duration",
    "parse_size",
    "redact_dsn",
]

log = logging.getLogger("ssepg.config")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Postgres refuses NOTIFY payloads of 8000 bytes and more.
PG_NOTIFY_LIMIT_BYTES = 7999

# The fields `Config.default` fits to the machine's cores and memory.
ADAPTED_FIELDS = (
    "fanout_shards",
    "ring_capacity",
    "client_buffer",
    "memory_pressure_threshold",
    "max_subscribers",
)

# Where the process's own files and the cgroup hierarchies are found; tests
# point detection at a directory tree of their own.
SYSTEM_ROOT = "/"

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kb": 1000,
    "kib": KiB,
    "m": MiB,
    "mb": 1000**2,
    "mib": MiB,
    "g": GiB,
    "gb": 1000**3,
    "gib": GiB,
}
_ORIGIN_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9_.~/-]*$")
# cgroup v1 writes "no limit" as a huge number near 2**63.
_CGROUP_V1_UNLIMITED = 1 << 60


def parse_duration(text: str) -> float:
    """``"15"``, ``"15s"``, ``"500ms"``, ``"2m"`` or ``"1h"`` in seconds.

    :raises ValueError: not such a duration.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_size(text: str) -> int:
    """``"262144"``, ``"256KiB"``, ``"1MiB"``, ``"2GB"`` in bytes.

    :raises ValueError: not such a size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _parse_optional_port(text: str) -> int | None:
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
    invalid value raises `ConfigError` naming the field. `Config.replace`
    derives a changed, validated copy. The ``repr`` never shows tokens or the
    DSN password.
    """

    dsn: str | None = field(
        default=None,
        metadata=_meta(
            "Postgres DSN; without one the service runs on an in-process broker "
            "(also DATABASE_URL)",
            _parse_optional_str,
            secret=True,
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
            _parse_optional_port,
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
            "database must use the same number",
            int,
        ),
    )
    fanout_shards: int = field(
        default=4,
        metadata=_meta("fan-out queues on the IOLoop (fairness between topics)", int),
    )
    ring_capacity: int = field(
        default=1024,
        metadata=_meta("events kept per topic for replay (a power of two)", int),
    )
    client_buffer: int = field(
        default=1 * MiB,
        metadata=_meta(
            "unsent bytes allowed per subscriber before it is dropped", parse_size
        ),
    )
    cors_origins: tuple[str, ...] = field(
        default=(),
        metadata=_meta("comma-separated origins allowed by CORS, or *", _parse_origins),
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
        metadata=_meta(
            "bearer token required to publish", _parse_optional_str, secret=True
        ),
    )
    listen_token: str | None = field(
        default=None,
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
            "subscribers shrink",
            parse_size,
        ),
    )

    def __post_init__(self) -> None:
        # Conveniences in code: a list of origins, or one comma-separated
        # string as the environment gives it.
        if isinstance(self.cors_origins, str):
            object.__setattr__(self, "cors_origins", _parse_origins(self.cors_origins))
        elif isinstance(self.cors_origins, list):
            object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        self._validate()

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{k}={v}' for k, v in self.redacted().items())})"

    def redacted(self) -> dict[str, str]:
        """Each field as ``repr`` text fit for logs: tokens shown as ``***``
        and the DSN without its password."""
        shown: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dsn":
                shown[f.name] = "None" if value is None else repr(redact_dsn(value))
            elif f.metadata["secret"] and value is not None:
                shown[f.name] = "'***'"
            else:
                shown[f.name] = repr(value)
        return shown

    def replace(self, **changes: Any) -> Config:
        """A copy with *changes* applied and validated.

        :raises ConfigError: a changed value is invalid.
        """
        return dataclasses.replace(self, **changes)

    def _validate(self) -> None:
        secret = {f.name for f in fields(self) if f.metadata["secret"]}

        def fail(name: str, message: str) -> None:
            # A secret's value never goes into a message that may be logged.
            if name in secret:
                raise ConfigError(name, message)
            raise ConfigError(name, f"{message}, got {getattr(self, name)!r}")

        def check_type(
            name: str, kinds: tuple[type, ...], optional: bool = False
        ) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, kinds):
                names = " or ".join(k.__name__ for k in kinds)
                fail(name, f"must be {names}" + (" or None" if optional else ""))

        for name in ("dsn", "publish_token", "listen_token"):
            check_type(name, (str,), optional=True)
        if self.dsn is not None and not self.dsn.strip():
            fail("dsn", "must not be blank")
        for name in ("publish_token", "listen_token"):
            value = getattr(self, name)
            if value is not None and (
                not value or not value.isprintable() or any(c.isspace() for c in value)
            ):
                fail(name, "must be a non-empty printable string without spaces")

        for name in ("base_path", "healthz"):
            check_type(name, (str,))
            value = getattr(self, name)
            if (
                not _PATH_RE.match(value)
                or "//" in value
                or (len(value) > 1 and value.endswith("/"))
            ):
                fail(name, "must be an absolute URL path without a trailing slash")
        if self.base_path == "/":
            fail("base_path", "must not be the root path")
        if self.healthz == "/":
            fail("healthz", "must not be the root path")
        if self.healthz == self.base_path or self.healthz.startswith(
            self.base_path + "/"
        ):
            fail("healthz", "must not lie under base_path")
        # Metrics are always served at /metrics, next to health.
        if self.healthz == "/metrics":
            fail("healthz", "must differ from /metrics")
        if self.base_path == "/metrics":
            fail("base_path", "must differ from /metrics")

        check_type("health_port", (int,), optional=True)
        if self.health_port is not None and not 1 <= self.health_port <= 65535:
            fail("health_port", "must be a TCP port (1-65535)")

        for name in (
            "keep_alive",
            "publish_timeout",
            "graceful_drain",
            "queue_poll_interval",
            "memory_cleanup_interval",
            "topic_idle_timeout",
            "queue_warn_threshold",
        ):
            check_type(name, (int, float))
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                fail(name, "must be a finite number >= 0")
        for name in (
            "keep_alive",
            "publish_timeout",
            "queue_poll_interval",
            "memory_cleanup_interval",
            "topic_idle_timeout",
        ):
            if getattr(self, name) <= 0:
                fail(name, "must be above 0")
        if not 0 < self.queue_warn_threshold <= 1:
            fail("queue_warn_threshold", "must be above 0 and at most 1")

        for name in (
            "notify_shards",
            "fanout_shards",
            "ring_capacity",
            "client_buffer",
            "max_notify_bytes",
            "max_body_bytes",
            "max_subscribers",
            "publish_retries",
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

    @classmethod
    def default(cls, **overrides: Any) -> Config:
        """Defaults fitted to this machine's cores and memory (cgroup limits
        respected), logged in two lines: what was detected and what was
        chosen. *overrides* win; ``notify_shards`` stays 8 unless overridden,
        since every instance on one database must use the same number.

        :raises ConfigError: an override is invalid.
        """
        cores, memory, source = detect_resources()
        chosen: dict[str, Any] = {
            # Shards are queues on one IOLoop: more of them make a hot topic
            # wait less behind others, a few per core is plenty.
            "fanout_shards": max(4, min(64, 4 * cores)),
            "ring_capacity": (
                1024 if memory >= 4 * GiB else 512 if memory >= GiB else 256
            ),
            "client_buffer": (
                1 * MiB
                if memory >= 8 * GiB
                else 512 * KiB
                if memory >= 2 * GiB
                else 256 * KiB
            ),
            "memory_pressure_threshold": max(64 * MiB, int(memory * 0.6)),
            "max_subscribers": _default_max_subscribers(memory),
        }
        chosen.update(overrides)
        config = cls(**chosen)
        log.info(
            "detected %d cores and %s of memory (%s)",
            cores,
            format_bytes(memory),
            source,
        )
        log.info(
            "chose fanout_shards=%d ring_capacity=%d client_buffer=%s "
            "memory_pressure_threshold=%s max_subscribers=%d notify_shards=%d",
            config.fanout_shards,
            config.ring_capacity,
            format_bytes(config.client_buffer),
            format_bytes(config.memory_pressure_threshold),
            config.max_subscribers,
            config.notify_shards,
        )
        return config

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, base: Config | None = None
    ) -> Config:
        """*base* (or `Config.default`) with ``DATABASE_URL`` and every
        ``SSEPG_<FIELD>`` variable of *environ* (default: the process
        environment) applied; ``SSEPG_DSN`` wins over ``DATABASE_URL``.

        :raises ConfigError: a variable cannot be parsed or is invalid.
        """
        environ = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        if environ.get("DATABASE_URL"):
            changes["dsn"] = environ["DATABASE_URL"]
        for f in fields(cls):
            key = env_name(f.name)
            if key in environ:
                changes[f.name] = _parse_field(f, environ[key], key)
        if base is None:
            return cls.default(**changes)
        return base.replace(**changes)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one ``--field-name`` option per field to *parser*."""
        group = parser.add_argument_group(
            "service settings",
            "Each also reads SSEPG_<FIELD> from the environment; the command "
            "line wins.",
        )
        defaults = cls()
        for f in fields(cls):
            value = getattr(defaults, f.name)
            if f.name in ADAPTED_FIELDS:
                shown = "fitted to the machine"
            elif isinstance(value, tuple):
                shown = ",".join(value) or "none"
            else:
                shown = "none" if value is None else str(value)
            group.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=None,
                metavar=f.name.upper(),
                help=(
                    f"{f.metadata['help']} ({env_name(f.name)}, default {shown})"
                ).replace("%", "%%"),
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, base: Config | None = None) -> Config:
        """*base* (or `Config.from_env`) with every option given on the
        command line applied.

        :raises ConfigError: an option cannot be parsed or is invalid.
        """
        base = cls.from_env() if base is None else base
        changes = {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                changes[f.name] = _parse_field(f, value, flag_name(f.name))
        return base.replace(**changes)


def env_name(name: str) -> str:
    """The environment variable of field *name*: ``SSEPG_<NAME>``."""
    return "SSEPG_" + name.upper()


def flag_name(name: str) -> str:
    """The command-line option of field *name*: ``--name-with-dashes``."""
    return "--" + name.replace("_", "-")


def _parse_field(f: dataclasses.Field[Any], text: str, source: str) -> Any:
    try:
        return f.metadata["parse"](text)
    except ValueError as exc:
        shown = "***" if f.metadata["secret"] else repr(text)
        raise ConfigError(f.name, f"cannot parse {shown} from {source}") from exc


def config_fields() -> Sequence[dataclasses.Field[Any]]:
    """The fields of `Config`, in declaration order."""
    return fields(Config)


def detect_resources(root: str | None = None) -> tuple[int, int, str]:
    """Usable cores and memory in bytes, and a few words on what limited
    them. The CPU affinity mask, cgroup v2 and cgroup v1 limits (of the
    process's own cgroup and its ancestors) win over what the host has.

    :param root: where ``proc`` and the cgroup mounts are found (tests use a
        directory tree of their own).
    """
    root = SYSTEM_ROOT if root is None else root
    if hasattr(os, "sched_getaffinity") and root == SYSTEM_ROOT:
        cores = len(os.sched_getaffinity(0))
    else:
        cores = psutil.cpu_count() or 1
    memory = int(psutil.virtual_memory().total)
    notes: list[str] = []
    cpu_limit, memory_limit = _cgroup_limits(root)
    if cpu_limit is not None and cpu_limit < cores:
        cores = max(1, math.ceil(cpu_limit))
        notes.append("cgroup cpu quota")
    if memory_limit is not None and memory_limit < memory:
        memory = memory_limit
        notes.append("cgroup memory limit")
    return cores, memory, ", ".join(notes) or "no cgroup limits"


def _read(root: str, path: str) -> str | None:
    try:
        with open(os.path.join(root, path.lstrip("/"))) as fh:
            return fh.read()
    except OSError:
        return None


def _cgroup_limits(root: str) -> tuple[float | None, int | None]:
    """The tightest CPU quota (in cores) and memory limit (bytes) of the
    process's cgroup and its ancestors, or None where there is none.

    The process's cgroup comes from ``/proc/self/cgroup`` and the mount
    points from ``/proc/self/mountinfo``, so a container whose cgroup
    filesystem shows the host's hierarchy is read at its own node.
    """
    membership = _read(root, "/proc/self/cgroup") or ""
    mountinfo = _read(root, "/proc/self/mountinfo") or ""
    v2_path: str | None = None
    v1_paths: dict[str, str] = {}
    for line in membership.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        for name in controllers.split(","):
            if name:
                v1_paths[name] = path
    cpu: float | None = None
    memory: int | None = None

    def tighter_cpu(value: float | None) -> None:
        nonlocal cpu
        if value is not None and (cpu is None or value < cpu):
            cpu = value

    def tighter_memory(value: int | None) -> None:
        nonlocal memory
        if value is not None and (memory is None or value < memory):
            memory = value

    for mount_root, mount_point, fstype, options in _cgroup_mounts(mountinfo):
        if fstype == "cgroup2" and v2_path is not None:
            for node in _nodes(root, mount_root, mount_point, v2_path):
                tighter_cpu(_v2_cpu(_read(root, node + "/cpu.max")))
                tighter_memory(_v2_memory(_read(root, node + "/memory.max")))
        elif fstype == "cgroup":
            if "cpu" in options and "cpu" in v1_paths:
                for node in _nodes(root, mount_root, mount_point, v1_paths["cpu"]):
                    tighter_cpu(
                        _v1_cpu(
                            _read(root, node + "/cpu.cfs_quota_us"),
                            _read(root, node + "/cpu.cfs_period_us"),
                        )
                    )
            if "memory" in options and "memory" in v1_paths:
                for node in _nodes(root, mount_root, mount_point, v1_paths["memory"]):
                    tighter_memory(
                        _v1_memory(_read(root, node + "/memory.limit_in_bytes"))
                    )
    return cpu, memory


def _cgroup_mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    # mountinfo: "id parent major:minor root mount-point options [tags] - fstype
    # source super-options"; cgroup v1 names its controllers in the last.
    mounts = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields_left = left.split()
        fields_right = right.split()
        if len(fields_left) < 5 or len(fields_right) < 3:
            continue
        fstype = fields_right[0]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        options = set(fields_right[2].split(","))
        mounts.append((fields_left[3], fields_left[4], fstype, options))
    return mounts


def _nodes(root: str, mount_root: str, mount_point: str, path: str) -> list[str]:
    """The directories of cgroup *path* and its ancestors below a mount of
    the hierarchy at *mount_point* (whose own root is *mount_root*)."""
    relative = path
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        relative = path[len(mount_root) :]
    elif mount_root != "/":
        # The mount shows another part of the hierarchy (a namespaced view):
        # its top is the best guess for this process's node.
        relative = "/"
    parts = [p for p in relative.split("/") if p and p != ".."]
    nodes = [mount_point]
    for index in range(len(parts)):
        nodes.append(mount_point.rstrip("/") + "/" + "/".join(parts[: index + 1]))
    existing = [n for n in nodes if os.path.isdir(os.path.join(root, n.lstrip("/")))]
    return existing


def _v2_cpu(text: str | None) -> float | None:
    if not text:
        return None
    parts = text.split()
    if len(parts) < 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v2_memory(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def _v1_cpu(quota_text: str | None, period_text: str | None) -> float | None:
    try:
        quota = int((quota_text or "").strip())
        period = int((period_text or "").strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_memory(text: str | None) -> int | None:
    text = (text or "").strip()
    if not text.isdigit() or int(text) >= _CGROUP_V1_UNLIMITED:
        return None
    return int(text)


def _default_max_subscribers(memory: int) -> int:
    # Each stream takes a file descriptor and, in the kernel, socket buffers
    # that may grow to a few hundred KiB for a client that reads slowly.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd_limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    by_memory = memory // (256 * KiB)
    return int(max(100, min(fd_limit - 256, by_memory)))
