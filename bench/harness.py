"""Shared parts of the benchmark scripts: starting and stopping a ssepg
server, CPU and memory sampling of process trees, the Postgres backends
that serve a given client, and markdown tables.

Nothing here is part of the library; the scripts in this directory import
it as a sibling module.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psutil

# Flags every benchmark server gets: quiet logs, and a short drain so that
# stopping a server between runs does not take the default five seconds.
SERVER_FLAGS = ["--log-level", "warning", "--graceful-drain", "0.2"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft
    limit. Every subscriber is a file descriptor."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def http_get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    """GET *url*; returns (status, decoded JSON or None). Never raises for
    HTTP errors or refused connections (status 0)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return 0, None


class Server:
    """A ssepg server run as a child process (``python -m ssepg``) for one
    benchmark run, on 127.0.0.1.

    :param dsn: Postgres DSN, or None for the in-process broker.
    :param processes: ``--processes``; above 1 the children share the port.
    :param extra: more command line flags.
    """

    def __init__(
        self,
        port: int,
        dsn: str | None = None,
        processes: int = 1,
        extra: Sequence[str] = (),
        python: str = sys.executable,
        log_path: str | None = None,
    ) -> None:
        self.port = port
        self.dsn = dsn
        self.processes = processes
        self.argv = [python, "-m", "ssepg", "--host", "127.0.0.1", "--port", str(port)]
        self.argv += SERVER_FLAGS
        if processes > 1:
            self.argv += ["--processes", str(processes)]
        self.argv += list(extra)
        self.log_path = log_path or os.devnull
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> str:
        """The command line, with the DSN given through the environment."""
        shown = " ".join(self.argv[1:])
        if self.dsn:
            return "DATABASE_URL=... python " + shown
        return "python " + shown

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until every process answers ``/healthz`` with ok.

        :raises RuntimeError: the server exited or did not become healthy.
        """
        env = dict(os.environ)
        env.pop("DATABASE_URL", None)
        for key in list(env):
            if key.startswith("SSEPG_"):
                del env[key]
        if self.dsn:
            env["DATABASE_URL"] = self.dsn
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            # A process group of its own, so that stop() can reach every process
            # the server forked even if the parent died first.
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        url = f"http://127.0.0.1:{self.port}/healthz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}; see {self.log_path}"
                )
            status, body = http_get_json(url, timeout=1.0)
            if status == 200 and isinstance(body, dict) and body.get("status") == "ok":
                seen.add(int(body.get("pid", 0)))
                # SO_REUSEPORT spreads new connections by hash: asking a few
                # times finds every process once all of them listen.
                if len(seen) >= self.processes:
                    return
                continue
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"server not healthy within {timeout:g} s; see {self.log_path}"
        )

    def pids(self) -> list[int]:
        """The server process and all its descendants."""
        if self.proc is None:
            return []
        return tree_pids(self.proc.pid)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the parent forwards it to its children), then SIGKILL to
        the process group for whatever is left."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        self.proc = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tree_pids(pid: int) -> list[int]:
    """*pid* and its descendants that exist now."""
    try:
        root = psutil.Process(pid)
        return [pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.Error:
        return []


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """user + system CPU seconds of each live process."""
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def memory_kib(pids: Iterable[int], pss: bool = False) -> float:
    """Summed RSS (or PSS, which splits shared pages between the processes
    and does not double-count a forked server) in KiB."""
    total = 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            total += p.memory_full_info().pss if pss else p.memory_info().rss
        except psutil.Error:
            pass
    return total / 1024


@contextmanager
def private_database(dsn: str, note: Any = None) -> Iterator[str]:
    """A DSN for a database created for this sitting and dropped after it.

    NOTIFY reaches only listeners of the same database, so other clients of
    the server neither add their notifications to the benchmark nor hear
    its own. Without the right to create databases, yields *dsn* itself.
    """
    import psycopg
    from psycopg.conninfo import make_conninfo

    name = "ssepg_bench_" + secrets.token_hex(4)
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        if note:
            note(f"cannot create a private database ({exc}); using the DSN as given")
        yield dsn
        return
    try:
        yield make_conninfo(dsn, dbname=name)
    finally:
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error as exc:
            if note:
                note(f"could not drop database {name}: {exc}")


def postgres_pids() -> list[int]:
    """Every local process named postgres (the postmaster and backends)."""
    out = []
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == "postgres":
            out.append(p.pid)
    return out


def postmaster_pid(dsn: str) -> int | None:
    """The postmaster of the server *dsn* points at, if it runs on this
    machine: from ``postmaster.pid`` in its data directory, else the oldest
    local process named postgres whose parent is not one."""
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
        if row:
            with open(os.path.join(row[0], "postmaster.pid")) as fh:
                return int(fh.readline().strip())
    except (psycopg.Error, OSError, ValueError):
        pass
    best = None
    for p in psutil.process_iter(["name", "ppid", "create_time"]):
        if p.info["name"] != "postgres":
            continue
        try:
            parent = psutil.Process(p.info["ppid"]).name()
        except psutil.Error:
            parent = ""
        if parent != "postgres" and (best is None or p.info["create_time"] < best[0]):
            best = (p.info["create_time"], p.pid)
    return best[1] if best else None


def backends_of(dsn: str, client_pids: Iterable[int]) -> list[int]:
    """PIDs of the Postgres backends serving TCP connections opened by the
    processes *client_pids* (matched on the client port)."""
    import psycopg

    ports = []
    for pid in client_pids:
        try:
            for c in psutil.Process(pid).net_connections(kind="tcp"):
                if c.raddr and c.status == psutil.CONN_ESTABLISHED:
                    ports.append(c.laddr.port)
        except psutil.Error:
            pass
    if not ports:
        return []
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)"
                " AND client_addr IS NOT NULL AND pid <> pg_backend_pid()",
                (ports,),
            ).fetchall()
    except psycopg.Error:
        return []
    return [int(r[0]) for r in rows]


class CPUWindow:
    """CPU use of process groups between `start` and `stop`, in percent of
    one core (100 = one core busy for the whole window).

    Groups are given as functions returning the PIDs to count; they are
    called again at `stop`, so processes started in between count fully.
    """

    def __init__(self) -> None:
        self._t0 = 0.0
        self._machine0 = 0.0
        self._before: dict[int, float] = {}
        self.wall_s = 0.0
        # Every process of the machine: what the measured ones did not use
        # went to other work, which the figures could not have.
        self.machine_pct = 0.0

    def start(self, pids: Iterable[int]) -> None:
        """Remember the CPU times of every process that may be counted."""
        self._before = cpu_seconds(pids)
        self._machine0 = machine_busy_seconds()
        self._t0 = time.monotonic()

    def stop_wall(self) -> None:
        self.wall_s = max(1e-6, time.monotonic() - self._t0)
        used = machine_busy_seconds() - self._machine0
        self.machine_pct = round(100.0 * used / self.wall_s, 1)

    def percent(self, pids: Iterable[int]) -> float:
        """CPU of *pids* over the window (call after `stop_wall`)."""
        now = cpu_seconds(pids)
        used = sum(v - self._before.get(pid, 0.0) for pid, v in now.items())
        return round(100.0 * used / self.wall_s, 1)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, every process)
    since boot, from ``/proc/stat``; 0.0 where that file does not exist."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()[1:]
    except OSError:
        return 0.0
    ticks = [int(x) for x in fields]
    # user nice system idle iowait irq softirq steal ...: idle and iowait
    # are not busy.
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


class MachineSampler:
    """Samples `machine_busy_seconds` in a thread, so that the machine's
    CPU use over a window known only afterwards can be computed."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), machine_busy_seconds()))
            if self._stop.wait(self.interval):
                break

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), machine_busy_seconds()))

    def percent(self, start: float, end: float) -> float | None:
        """Busy percent of one core between the samples nearest to the
        monotonic times *start* and *end* (200 = two cores busy)."""
        if len(self.samples) < 2 or end <= start:
            return None
        a = min(self.samples, key=lambda s: abs(s[0] - start))
        b = min(self.samples, key=lambda s: abs(s[0] - end))
        if b[0] <= a[0]:
            return None
        return round(100.0 * (b[1] - a[1]) / (b[0] - a[0]), 1)


def fmt_num(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def percentile(sorted_values: Sequence[int], q: float) -> int | None:
    """The *q* quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]
