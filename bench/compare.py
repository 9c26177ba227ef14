"""One side-by-side sitting: ssepg and reference servers under the same
external load generator, plus the publish paths that have no counterpart.

Usage::

    python bench/compare.py --ssebench PATH [--anchors DIR] [--dsn DSN] \\
        [--out DIR] [--plot FILE.png] [--quick]

``--ssebench`` is the path of an ``ssebench`` binary (a C SSE load
generator printing one JSON line per run). ``--anchors`` is optional: a
directory with ``nchan/nchan.sh`` (Nchan on port 8091, ``start 1|auto`` /
``stop``) and ``peer/peer.sh`` (a Python SSE server on port 8092, ``start``
/ ``stop``), each printing the PID it started; a
``pg_notify_ceiling.py`` next to that directory, if present, is run too.
Without ``--anchors`` only ssepg is measured.

The sitting, each run with a fresh server and bounded in time:

1. W1, W2, W3L, W4 (and W4 with gzip for ssepg), W5 with ``ssebench``
   against ssepg embedded (no DSN), ssepg on Postgres, ssepg on Postgres
   with ``--processes 2``, and the anchors (Nchan with 1 and with
   ``auto`` workers, the Python peer).
2. Batch publish (``POST /topics``, 1,000 events per request) with this
   directory's load generator, and the library path (``bench/library.py``).
3. The Postgres NOTIFY ceiling (``bench/pg_ceiling.py`` and, if found,
   the anchors' probe), batched and one NOTIFY per transaction.
4. With ``--sweep`` (default 1000,2000,5000,10000): fan-out to one topic
   at each subscriber count, at full speed (delivery rate) and at 10
   events/s (p99 latency), for ssepg on Postgres and Nchan with 1 worker.

Writes ``raw.jsonl`` (every result), ``table.md`` (the tables and the
goals met or missed) and ``sweep.json`` into ``--out``, prints
``table.md``, and draws the sweep into ``--plot`` if matplotlib is there.
CPU columns, in percent of one core over ssebench's measuring window:
the server (with ``--server-pid-tree`` for forking servers), Postgres,
ssebench itself, and every other process of the machine (sampled from
``/proc/stat``), so that a starved server is told from an idle one.
Postgres CPU is that of the backends serving the server under test
(matched by client port), in CPU-seconds over the whole run divided by
the measuring window, since they are idle outside it. With a DSN the
sitting runs in a database created for it and dropped after it
(``--shared-db`` to use the DSN's own). ``--reps N`` repeats each run and
shows the median one. The sitting stops starting runs after 27 minutes
for each repetition asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    MachineSampler,
    Server,
    backends_of,
    cpu_seconds,
    fmt_num,
    free_port,
    markdown_table,
    private_database,
    raise_fd_limit,
)
from loadgen import random_prefix  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# The anchors' common ssebench flags, and their workloads.
COMMON = shlex.split(
    "--payload 64 --settle 2 --pub-conns 8 --connect-rate 2000 "
    "--connect-inflight 256 --connect-timeout 60"
)
WORKLOADS: dict[str, list[str]] = {
    name: shlex.split(flags)
    for name, flags in (
        ("W1", "--subs 1000 --topics 1 --messages 2000 --timeout 180"),
        ("W2", "--subs 1000 --topics 100 --messages 20000 --timeout 180"),
        (
            "W3L",
            "--subs 100 --topics 1 --messages 1000 --rate 100 --timeout 40 --drain 30",
        ),
        ("W4", "--subs 5000 --topics 100 --messages 0 --hold 20"),
        ("W5", "--subs 0 --topics 100 --messages 20000 --timeout 120"),
    )
}
QUICK = {
    "W1": ["--messages", "500"],
    "W2": ["--messages", "5000"],
    "W3L": ["--messages", "500"],
    "W4": ["--hold", "5"],
    "W5": ["--messages", "5000"],
}

SSEPG_SYSTEMS = ("ssepg-embedded", "ssepg-pg", "ssepg-pg-p2")
ANCHOR_SYSTEMS = ("nchan1", "nchanauto", "peer")

# Events per second of the latency half of the sweep.
PACED_RATE = 10.0

# Bound of a sitting, per repetition (--reps): runs that would start after it
# are skipped.
BUDGET_S = 27 * 60


class System:
    """A server under test: started fresh for each run, stopped after."""

    def __init__(
        self, name: str, url: str, tree: bool, uses_pg: bool = False, workers: int = 1
    ) -> None:
        self.name = name
        self.url = url
        self.tree = tree
        self.uses_pg = uses_pg
        # Processes doing the work: a server above 85 % of that many cores is
        # the bottleneck.
        self.workers = workers
        self.pid = 0

    def start(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def is_alive(self) -> bool:
        import psutil

        try:
            return bool(self.pid) and psutil.Process(self.pid).status() != "zombie"
        except psutil.Error:
            return False

    def all_pids(self) -> list[int]:
        from harness import tree_pids

        return tree_pids(self.pid) if self.pid else []

    def describe(self) -> str:
        raise NotImplementedError


class SsepgSystem(System):
    def __init__(
        self, name: str, dsn: str | None, processes: int, log_dir: str
    ) -> None:
        self.port = free_port()
        super().__init__(
            name,
            f"http://127.0.0.1:{self.port}/topics/{{topic}}/events",
            tree=processes > 1,
            uses_pg=dsn is not None,
            workers=processes,
        )
        self.server = Server(
            self.port,
            dsn=dsn,
            processes=processes,
            log_path=os.path.join(log_dir, f"{name}.log"),
        )

    def start(self) -> int:
        self.server.start()
        self.pid = self.server.pid
        return self.pid

    def stop(self) -> None:
        self.server.stop()
        self.pid = 0

    def describe(self) -> str:
        return self.server.command()


class ScriptSystem(System):
    """An anchor started and stopped by its own shell script."""

    def __init__(
        self,
        name: str,
        url: str,
        tree: bool,
        script: str,
        start_args: list[str],
        env: dict[str, str],
    ) -> None:
        super().__init__(name, url, tree, uses_pg="PEER_DSN" in env)
        self.script = script
        self.start_args = start_args
        self.env = dict(os.environ, **env)

    def start(self) -> int:
        self.stop()
        out = subprocess.run(
            [self.script, "start", *self.start_args],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
            check=True,
        )
        self.pid = int(out.stdout.strip().splitlines()[-1])
        time.sleep(1.0)
        return self.pid

    def stop(self) -> None:
        subprocess.run(
            [self.script, "stop"],
            capture_output=True,
            timeout=60,
            env=self.env,
            check=False,
        )
        self.pid = 0

    def describe(self) -> str:
        return " ".join(
            [
                os.path.basename(os.path.dirname(self.script))
                + "/"
                + os.path.basename(self.script),
                "start",
                *self.start_args,
            ]
        )


def url_dsn(dsn: str) -> str:
    """*dsn* as a URL (the peer's driver takes no key=value strings)."""
    if "://" in dsn:
        return dsn
    from urllib.parse import quote

    from psycopg.conninfo import conninfo_to_dict

    d = conninfo_to_dict(dsn)
    auth = quote(str(d.get("user", "")))
    if d.get("password"):
        auth += ":" + quote(str(d["password"]))
    host = d.get("host", "127.0.0.1")
    port = d.get("port", 5432)
    return f"postgresql://{auth}@{host}:{port}/{d.get('dbname', 'postgres')}"


def make_systems(
    names: list[str], dsn: str | None, anchors: str | None, log_dir: str
) -> dict[str, System]:
    out: dict[str, System] = {}
    for name in names:
        if name == "ssepg-embedded":
            out[name] = SsepgSystem(name, None, 1, log_dir)
        elif name in ("ssepg-pg", "ssepg-pg-p2"):
            if dsn:
                out[name] = SsepgSystem(
                    name, dsn, 2 if name.endswith("p2") else 1, log_dir
                )
        elif anchors and name in ("nchan1", "nchanauto"):
            script = os.path.join(anchors, "nchan", "nchan.sh")
            if os.path.exists(script):
                out[name] = ScriptSystem(
                    name,
                    "http://127.0.0.1:8091/topics/{topic}/events",
                    True,
                    script,
                    ["1" if name == "nchan1" else "auto"],
                    {},
                )
                out[name].workers = 1 if name == "nchan1" else (os.cpu_count() or 1)
        elif anchors and name == "peer" and dsn:
            script = os.path.join(anchors, "peer", "peer.sh")
            if os.path.exists(script):
                out[name] = ScriptSystem(
                    name,
                    "http://127.0.0.1:8092/topics/{topic}/events",
                    False,
                    script,
                    [],
                    {"PEER_DSN": url_dsn(dsn)},
                )
    return out


def run_ssebench(
    binary: str,
    system: System,
    label: str,
    args: list[str],
    dsn: str | None,
    timeout: float,
) -> dict[str, Any]:
    """Start *system*, run ssebench with *args* once, stop it."""
    try:
        pid = system.start()
    except (subprocess.SubprocessError, RuntimeError, OSError, ValueError) as exc:
        system.stop()
        return {"error": f"cannot start {system.name}: {exc}"}
    result: dict[str, Any]
    # Topics of their own, so that no other run's events can count.
    cmd = [
        binary,
        "--url",
        system.url,
        *COMMON,
        *args,
        "--server-pid",
        str(pid),
        "--label",
        label,
        "--topic-prefix",
        random_prefix() + "t",
    ]
    if system.tree:
        cmd.append("--server-pid-tree")
    pg_before: dict[int, float] = {}
    dsn = dsn if system.uses_pg else None
    if dsn:
        from harness import postgres_pids

        pg_before = cpu_seconds(postgres_pids())
    sampler = MachineSampler()
    sampler.start()
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            ended = time.monotonic()
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            result = json.loads(lines[-1]) if lines else {"error": err.strip()[-300:]}
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            ended = time.monotonic()
            result = {"error": f"ssebench exceeded {timeout:g} s"}
        sampler.stop()
        if not system.is_alive():
            result["server_died"] = True
        for key in ("server_cpu_pct", "self_cpu_pct"):
            # ssebench cannot sample a server that exited: no figure then.
            if (result.get(key) or 0) > 100_000:
                result[key] = None
        if dsn and "error" not in result:
            backends = backends_of(dsn, system.all_pids())
            after = cpu_seconds(backends)
            used = sum(v - pg_before.get(p, 0.0) for p, v in after.items())
            window = result.get("cpu_window_s") or 0
            result["pg_cpu_pct"] = round(100 * used / window, 1) if window else None
            result["pg_backends"] = len(backends)
        window = result.get("cpu_window_s") or 0
        if window:
            # ssebench's window ends when the last event arrived (or the hold
            # did), moments before it exits.
            machine = sampler.percent(ended - window, ended)
            if machine is not None:
                used = sum(
                    result.get(k) or 0.0
                    for k in ("server_cpu_pct", "pg_cpu_pct", "self_cpu_pct")
                )
                result["machine_cpu_pct"] = machine
                result["other_cpu_pct"] = round(max(0.0, machine - used), 1)
    finally:
        system.stop()
    result["cmd"] = " ".join(shlex.quote(c) for c in cmd[1:])
    result["server_cmd"] = system.describe()
    return result


def run_json_script(
    argv: list[str], timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    try:
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ, **(env or {})),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"exceeded {timeout:g} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def median_run(runs: list[dict[str, Any]], workload: str) -> dict[str, Any]:
    """The run whose key figure is the median of *runs* (errors last): the
    table shows that whole run, so its CPU columns match its figure."""
    ok = [r for r in runs if not r.get("error")] or runs
    if workload.startswith("W4"):
        key = "pss_kib_per_sub" if ok[0].get("multi") else "rss_kib_per_sub"
    else:
        key = {"W3L": "lat_us_p99", "W5": "publish_rate"}.get(workload, "delivery_rate")
    ordered = sorted(ok, key=lambda r: r.get(key) or 0)
    return ordered[(len(ordered) - 1) // 2]


def per_sub_hold(r: dict[str, Any], pss: bool) -> float | None:
    key = "pss_kib" if pss else "rss_kib"
    end, before = r.get(f"{key}_hold_end"), r.get(f"{key}_before")
    n = r.get("subs_connected")
    if end is None or before is None or not n:
        return None
    return round(float(end - before) / float(n), 2)


def main_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "system",
        "workload",
        "deliveries/s",
        "publishes/s",
        "p50 / p99 (ms)",
        "memory/sub (KiB): connected, after hold",
        "delivered / expected, lost, dup, closed early",
        "CPU % server / Postgres / ssebench / other",
        "notes",
    ]
    out = []
    for r in rows:
        if r.get("kind") != "ssebench":
            continue
        w = r["workload"]
        if r.get("error"):
            out.append(
                [r["system"], w, "-", "-", "-", "-", "-", "-", "error: " + r["error"]]
            )
            continue
        pss = bool(r.get("multi"))
        lat = "-"
        if r.get("lat_us_p50"):
            lat = f"{r['lat_us_p50'] / 1000:.1f} / {r['lat_us_p99'] / 1000:.1f}"
        mem = "-"
        if w.startswith("W4"):
            per = r.get("pss_kib_per_sub") if pss else r.get("rss_kib_per_sub")
            mem = f"{fmt_num(per, 1)}, {fmt_num(per_sub_hold(r, pss), 1)}"
            mem += " (PSS)" if pss else " (RSS)"
        if w == "W5":
            deliv = (
                f"{fmt_num(r.get('published'))} published, "
                f"{r.get('publish_errors')} errors"
            )
        elif w.startswith("W4"):
            deliv = (
                f"{fmt_num(r.get('subs_connected'))} connected, "
                f"{r.get('subs_closed_early', 0)} closed"
            )
        else:
            deliv = (
                f"{fmt_num(r.get('delivered'))} / "
                f"{fmt_num(r.get('expected_deliveries'))}, "
                f"{fmt_num(r.get('lost'))}, {fmt_num(r.get('duplicates'))}, "
                f"{r.get('subs_closed_early', 0)}"
            )
        cpu = (
            f"{fmt_num(r.get('server_cpu_pct'))} / {fmt_num(r.get('pg_cpu_pct'))} / "
            f"{fmt_num(r.get('self_cpu_pct'))} / {fmt_num(r.get('other_cpu_pct'))}"
        )
        notes = []
        s_cpu = r.get("server_cpu_pct") or 0
        g_cpu = r.get("self_cpu_pct") or 0
        other = r.get("other_cpu_pct") or 0
        total = s_cpu + g_cpu + (r.get("pg_cpu_pct") or 0) + other
        if not w.startswith("W4"):
            if total >= 85 * (os.cpu_count() or 1):
                notes.append(
                    f"machine full, other processes took {other:.0f} %"
                    if other >= 25
                    else "machine-bound"
                )
            elif g_cpu >= 85:
                notes.append("ssebench-bound")
            elif s_cpu >= 85 * (r.get("workers") or 1):
                notes.append("server-bound")
        if r.get("server_died"):
            notes.append("server exited during the run")
        if r.get("timed_out") and not w.startswith("W4"):
            notes.append("timed out")
        if r.get("sub_failed"):
            notes.append(f"{r['sub_failed']} subscribers failed")
        if r.get("publish_errors"):
            notes.append(f"{r['publish_errors']} publish errors")
        if r.get("reps", 1) > 1:
            notes.append(f"median of {r['reps']} runs")
        out.append(
            [
                r["system"],
                w,
                fmt_num(r.get("delivery_rate")) if r.get("delivered") else "-",
                fmt_num(r.get("publish_rate")),
                lat,
                mem,
                deliv,
                cpu,
                "; ".join(notes),
            ]
        )
    return markdown_table(header, out)


def extra_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "measurement",
        "rate (events/s)",
        "check",
        "CPU % process / Postgres / generator",
        "notes",
    ]
    out = []
    for r in rows:
        kind = r.get("kind")
        if kind == "batch":
            if r.get("error"):
                out.append([f"batch publish, {r['system']}", "-", "-", "-", r["error"]])
                continue
            out.append(
                [
                    f"batch publish (POST /topics, 1,000 per request), {r['system']}",
                    f"{fmt_num(r.get('publish_rate'))} published, "
                    f"{fmt_num(r.get('delivery_rate'))} delivered",
                    f"{fmt_num(r.get('delivered'))} / "
                    f"{fmt_num(r.get('expected_deliveries'))}, "
                    f"lost {r.get('lost')}, dup {r.get('duplicates')}, "
                    f"errors {r.get('publish_errors')}",
                    f"{fmt_num(r.get('server_cpu_pct'))} / "
                    f"{fmt_num(r.get('pg_cpu_pct'))} / {fmt_num(r.get('gen_cpu_pct'))}",
                    "timed out" if r.get("timed_out") else "",
                ]
            )
        elif kind == "library":
            if r.get("error"):
                out.append([f"library path, {r['system']}", "-", "-", "-", r["error"]])
                continue
            out.append(
                [
                    f"library path (service.publish, {r.get('tasks')} tasks), "
                    f"{r['system']}",
                    f"{fmt_num(r.get('publish_rate'))} published, "
                    f"{fmt_num(r.get('heard_rate'))} heard back",
                    f"{fmt_num(r.get('heard'))} / {fmt_num(r.get('published'))} "
                    "heard back",
                    f"{fmt_num(r.get('cpu_pct'))} / {fmt_num(r.get('pg_cpu_pct'))} / -",
                    "",
                ]
            )
        elif kind == "ceiling":
            if r.get("error"):
                out.append([f"NOTIFY ceiling, {r['label']}", "-", "-", "-", r["error"]])
                continue
            got = r.get("received", r.get("received_median"))
            out.append(
                [
                    f"NOTIFY ceiling, {r['label']}",
                    f"{fmt_num(r.get('publish_rate'))} sent, "
                    f"{fmt_num(r.get('recv_rate'))} heard",
                    f"{fmt_num(got)} / {fmt_num(r.get('sent'))} heard",
                    "-",
                    r.get("probe", ""),
                ]
            )
    return markdown_table(header, out)


def _find(
    rows: list[dict[str, Any]], system: str, workload: str
) -> dict[str, Any] | None:
    # With --reps, only the median run of each pair counts (the one the
    # table shows); the other runs are kept in raw.jsonl as "ssebench-rep".
    for r in rows:
        if (
            r.get("system") == system
            and r.get("workload") == workload
            and r.get("kind") != "ssebench-rep"
            and not r.get("error")
        ):
            return r
    return None


def goals(rows: list[dict[str, Any]]) -> str:
    """The issue's goals, each with the figures of this sitting."""
    lines = []

    def ratio(
        a: dict[str, Any] | None, b: dict[str, Any] | None, key: str
    ) -> float | None:
        if not a or not b or not b.get(key):
            return None
        return float(a.get(key) or 0) / float(b[key])

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "MISSED")

    def add(goal: str, figure: str, ok: bool | None) -> None:
        lines.append([goal, figure, verdict(ok)])

    pg1, n1 = _find(rows, "ssepg-pg", "W1"), _find(rows, "nchan1", "W1")
    p2, na = _find(rows, "ssepg-pg-p2", "W1"), _find(rows, "nchanauto", "W1")
    emb = _find(rows, "ssepg-embedded", "W1")
    r = ratio(pg1, n1, "delivery_rate")
    add(
        "W1: ssepg (Postgres, 1 process) >= 2.5x Nchan 1 worker",
        f"{r:.2f}x" if r is not None else "-",
        None if r is None else r >= 2.5,
    )
    r = ratio(p2, na, "delivery_rate")
    add(
        "W1: --processes 2 >= 1.3x Nchan 2 workers",
        f"{r:.2f}x" if r is not None else "-",
        None if r is None else r >= 1.3,
    )
    r = ratio(emb, pg1, "delivery_rate")
    add(
        "W1: embedded >= Postgres",
        f"{r:.2f}x" if r is not None else "-",
        None if r is None else r >= 1.0,
    )
    r = ratio(
        _find(rows, "ssepg-pg-p2", "W2"),
        _find(rows, "nchanauto", "W2"),
        "delivery_rate",
    )
    add(
        "W2: --processes 2 >= Nchan 2 workers",
        f"{r:.2f}x" if r is not None else "-",
        None if r is None else r >= 1.0,
    )
    for mine, theirs in (("ssepg-pg", "nchan1"), ("ssepg-pg-p2", "nchanauto")):
        a, b = _find(rows, mine, "W3L"), _find(rows, theirs, "W3L")
        if a and b and a.get("lat_us_p99") and b.get("lat_us_p99"):
            add(
                f"W3L: p99 of {mine} <= p99 of {theirs}",
                f"{a['lat_us_p99'] / 1000:.1f} ms vs {b['lat_us_p99'] / 1000:.1f} ms",
                a["lat_us_p99"] <= b["lat_us_p99"],
            )
        else:
            add(f"W3L: p99 of {mine} <= p99 of {theirs}", "-", None)
    for w, limit in (("W4", 5.0), ("W4gz", 6.0)):
        a = _find(rows, "ssepg-pg", w)
        per = a.get("rss_kib_per_sub") if a else None
        hold = per_sub_hold(a, False) if a else None
        add(
            f"{w}: <= {limit:g} KiB per idle subscriber (ssepg Postgres)",
            f"{per:.1f} KiB after connect, {hold or 0:.1f} KiB after hold"
            if per is not None
            else "-",
            None if per is None else max(per, hold or 0) <= limit,
        )
    peer = _find(rows, "peer", "W5")
    r = ratio(_find(rows, "ssepg-pg", "W5"), peer, "publish_rate")
    add(
        "W5: one process >= the peer",
        f"{r:.2f}x" if r is not None else "-",
        None if r is None else r >= 1.0,
    )
    r = ratio(_find(rows, "ssepg-pg-p2", "W5"), peer, "publish_rate")
    add(
        "W5: --processes 2 >= 2x the peer",
        f"{r:.2f}x" if r is not None else "-",
        None if r is None else r >= 2.0,
    )
    batch = next(
        (
            r
            for r in rows
            if r.get("kind") == "batch"
            and r["system"] == "ssepg-pg"
            and not r.get("error")
        ),
        None,
    )
    add(
        "batch publish >= 50,000 events/s through Postgres, one process",
        fmt_num(batch.get("publish_rate")) if batch else "-",
        None if not batch else batch.get("publish_rate", 0) >= 50_000,
    )
    lib = next(
        (
            r
            for r in rows
            if r.get("kind") == "library"
            and r["system"] == "ssepg-pg"
            and not r.get("error")
        ),
        None,
    )
    ceil = [
        r
        for r in rows
        if r.get("kind") == "ceiling"
        and r.get("mode") == "batch"
        and not r.get("error")
    ]
    best = max((c.get("publish_rate") or 0 for c in ceil), default=0)
    if lib and best:
        share = lib["publish_rate"] / best
        add(
            "library path >= 50% of the batched NOTIFY ceiling",
            f"{fmt_num(lib['publish_rate'])} / {fmt_num(best)} = {share:.0%}",
            share >= 0.5,
        )
    else:
        add("library path >= 50% of the batched NOTIFY ceiling", "-", None)
    bad = []
    for row in rows:
        if row.get("kind") not in ("ssebench", "batch") or row.get("error"):
            continue
        if not str(row.get("system", "")).startswith("ssepg"):
            continue
        problems = []
        if row.get("lost"):
            problems.append(f"lost {row['lost']}")
        if row.get("duplicates"):
            problems.append(f"dup {row['duplicates']}")
        closed = row.get("subs_closed_early", row.get("closed_early"))
        if closed:
            problems.append(f"{closed} closed early")
        if problems:
            bad.append(f"{row['system']} {row['workload']}: " + ", ".join(problems))
    add(
        "no event lost or duplicated, no stream closed early (ssepg runs)",
        "; ".join(bad) or "none seen",
        not bad,
    )
    return markdown_table(["goal", "this sitting", "verdict"], lines)


def sweep_runs(
    binary: str,
    systems: dict[str, System],
    names: list[str],
    counts: list[int],
    dsn: str | None,
    deadline: float,
    say: Any,
) -> list[dict[str, Any]]:
    out = []
    for name in names:
        system = systems.get(name)
        if system is None:
            continue
        for n in counts:
            for kind in ("max", "paced"):
                if time.monotonic() > deadline:
                    say(f"sweep {name} {n} {kind}: skipped (time budget)")
                    continue
                if kind == "max":
                    msgs = max(100, 1_000_000 // n)
                    args = f"--subs {n} --topics 1 --messages {msgs} --timeout 120"
                else:
                    args = (
                        f"--subs {n} --topics 1 --messages 50 --rate {PACED_RATE:g} "
                        "--timeout 30 --drain 20"
                    )
                r = run_ssebench(
                    binary, system, f"{name}/sweep{n}/{kind}", args.split(), dsn, 240
                )
                r.update({"kind": "sweep", "system": name, "subs_n": n, "mode": kind})
                say(
                    f"sweep {name} {n} {kind}: rate {r.get('delivery_rate')} "
                    f"p99 {r.get('lat_us_p99')} lost {r.get('lost')} "
                    f"cpu {r.get('server_cpu_pct')}/{r.get('self_cpu_pct')}"
                )
                out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Side-by-side benchmark sitting.")
    parser.add_argument("--ssebench", required=True, help="path of the ssebench binary")
    parser.add_argument(
        "--anchors", help="directory with nchan/ and peer/ start scripts"
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL"),
        help="Postgres DSN (default DATABASE_URL)",
    )
    parser.add_argument("--out", help="directory for raw.jsonl, table.md, sweep.json")
    parser.add_argument("--plot", help="write the sweep plot (PNG) here")
    parser.add_argument("--systems", default=",".join(SSEPG_SYSTEMS + ANCHOR_SYSTEMS))
    parser.add_argument("--workloads", default="W1,W2,W3L,W4,W4gz,W5")
    parser.add_argument(
        "--sweep",
        default="1000,2000,5000,10000",
        help="subscriber counts of the fan-out sweep ('' to skip)",
    )
    parser.add_argument("--sweep-systems", default="ssepg-pg,nchan1")
    parser.add_argument(
        "--ceiling-script",
        help="another NOTIFY ceiling probe to run (default: "
        "pg_notify_ceiling.py next to --anchors, if any)",
    )
    parser.add_argument(
        "--no-extras",
        action="store_true",
        help="skip batch publish, library path and ceilings",
    )
    parser.add_argument("--quick", action="store_true", help="fewer events, 5 s holds")
    parser.add_argument(
        "--reps",
        type=int,
        default=1,
        help="runs per system and workload; the table shows the median run",
    )
    parser.add_argument(
        "--shared-db",
        action="store_true",
        help="use the DSN's database as is instead of a private one "
        "created and dropped by the sitting",
    )
    args = parser.parse_args(argv)
    # A plain SIGTERM would skip the cleanup below (servers, the database).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.dsn and not args.shared_db:
        with private_database(
            args.dsn, note=lambda text: print(text, file=sys.stderr)
        ) as dsn:
            args.dsn = dsn
            return sitting(args)
    return sitting(args)


def sitting(args: argparse.Namespace) -> int:
    """Every run of the sitting, then the report."""
    if not os.access(args.ssebench, os.X_OK):
        print(f"not an executable: {args.ssebench}", file=sys.stderr)
        return 2
    raise_fd_limit()
    started = time.monotonic()
    deadline = started + BUDGET_S * max(1, args.reps)
    out_dir = args.out or tempfile.mkdtemp(prefix="ssepg-compare-")
    os.makedirs(out_dir, exist_ok=True)
    log_dir = os.path.join(out_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    anchors = os.path.abspath(args.anchors) if args.anchors else None
    names = [s for s in args.systems.split(",") if s]
    systems = make_systems(names, args.dsn, anchors, log_dir)
    sweep_names = [s for s in args.sweep_systems.split(",") if s]
    for s, sy in make_systems(sweep_names, args.dsn, anchors, log_dir).items():
        systems.setdefault(s, sy)
    raw = open(os.path.join(out_dir, "raw.jsonl"), "w")  # noqa: SIM115 - closed below
    rows: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    counts = [int(x) for x in args.sweep.split(",") if x.strip()]

    def say(text: str) -> None:
        print(
            f"[{time.monotonic() - started:6.0f} s] {text}", file=sys.stderr, flush=True
        )

    def keep(row: dict[str, Any]) -> None:
        rows.append(row)
        raw.write(json.dumps(row) + "\n")
        raw.flush()

    try:
        for name in names:
            system = systems.get(name)
            if system is None:
                say(f"{name}: not available (needs --dsn or --anchors)")
                continue
            for w in args.workloads.split(","):
                gz = w == "W4gz"
                if gz and not name.startswith("ssepg"):
                    continue
                base = WORKLOADS["W4" if gz else w]
                wargs = base + (QUICK["W4" if gz else w] if args.quick else [])
                if gz:
                    wargs = wargs + ["--gzip"]
                if time.monotonic() > deadline:
                    say(f"{name} {w}: skipped (time budget)")
                    continue
                runs = []
                for rep in range(args.reps):
                    if rep and time.monotonic() > deadline:
                        break
                    r = run_ssebench(
                        args.ssebench, system, f"{name}/{w}", wargs, args.dsn, 420
                    )
                    r.update(
                        {
                            "kind": "ssebench-rep",
                            "system": name,
                            "workload": w,
                            "multi": system.tree,
                            "workers": system.workers,
                            "rep": rep + 1,
                        }
                    )
                    say(
                        f"{name} {w}: delivered {r.get('delivery_rate')}/s published "
                        f"{r.get('publish_rate')}/s p99 {r.get('lat_us_p99')} us "
                        f"rss/sub {r.get('rss_kib_per_sub')} lost {r.get('lost')} "
                        f"cpu {r.get('server_cpu_pct')}/{r.get('pg_cpu_pct')}/"
                        f"{r.get('self_cpu_pct')}/{r.get('other_cpu_pct')} "
                        f"{r.get('error', '')}"
                    )
                    runs.append(r)
                chosen = median_run(runs, w)
                for r in runs:
                    if r is chosen:
                        r.update({"kind": "ssebench", "reps": len(runs)})
                    keep(r)
        if not args.no_extras:
            for row in extras(args, anchors, deadline, say):
                keep(row)
        if counts:
            sweep = sweep_runs(
                args.ssebench, systems, sweep_names, counts, args.dsn, deadline, say
            )
            for row in sweep:
                keep(row)
            with open(os.path.join(out_dir, "sweep.json"), "w") as fh:
                json.dump(sweep, fh, indent=1)
    finally:
        for system in systems.values():
            system.stop()
        raw.close()
    text = report(rows, args, time.monotonic() - started)
    with open(os.path.join(out_dir, "table.md"), "w") as fh:
        fh.write(text)
    print(text)
    if args.plot and counts:
        try:
            from plot import draw
        except ImportError:
            say("no matplotlib: skipping the plot (pip install matplotlib)")
        else:
            draw(sweep, args.plot)
            say(f"plot written to {args.plot}")
    say(f"results in {out_dir}")
    return 0


def extras(
    args: argparse.Namespace, anchors: str | None, deadline: float, say: Any
) -> list[dict[str, Any]]:
    """Batch publish, the library path and the NOTIFY ceilings."""
    from run import WORKLOADS as OWN
    from run import run_load

    rows: list[dict[str, Any]] = []
    log_dir = tempfile.mkdtemp(prefix="ssepg-batch-")
    for system, dsn in (("ssepg-pg", args.dsn), ("ssepg-embedded", None)):
        if system == "ssepg-pg" and not dsn:
            continue
        if time.monotonic() > deadline:
            break
        spec = dict(OWN["BATCH"])
        if args.quick:
            spec["messages"] = 25_000
        try:
            r = run_load(
                "postgres" if dsn else "embedded",
                "BATCH",
                spec,
                dsn,
                1,
                2,
                os.path.join(log_dir, f"{system}.log"),
            )
        except (RuntimeError, TimeoutError, OSError) as exc:
            r = {"error": str(exc)}
        r.update({"kind": "batch", "system": system})
        say(
            f"batch {system}: published {r.get('publish_rate')}/s delivered "
            f"{r.get('delivery_rate')}/s lost {r.get('lost')} {r.get('error', '')}"
        )
        rows.append(r)
    messages = 50_000 if args.quick else 200_000
    for system, dsn in (("ssepg-pg", args.dsn), ("ssepg-embedded", None)):
        if system == "ssepg-pg" and not dsn:
            continue
        argv = [
            sys.executable,
            os.path.join(HERE, "library.py"),
            "--messages",
            str(messages),
        ]
        if dsn:
            argv += ["--dsn", dsn]
        r = run_json_script(argv, 300)
        r.update({"kind": "library", "system": system})
        say(f"library {system}: {r.get('publish_rate')}/s {r.get('error', '')}")
        rows.append(r)
    if not args.dsn:
        return rows
    n = 50_000 if args.quick else 200_000
    probes = [
        (
            "own probe, batch of 100",
            "batch",
            [
                os.path.join(HERE, "pg_ceiling.py"),
                "--mode",
                "batch",
                "--batch",
                "100",
                "--messages",
                str(n),
                "--dsn",
                args.dsn,
            ],
        ),
        (
            "own probe, one NOTIFY per transaction, 4 connections",
            "single",
            [
                os.path.join(HERE, "pg_ceiling.py"),
                "--mode",
                "single",
                "--publishers",
                "4",
                "--messages",
                str(n // 10),
                "--dsn",
                args.dsn,
            ],
        ),
    ]
    other = args.ceiling_script or (
        os.path.join(os.path.dirname(anchors), "pg_notify_ceiling.py")
        if anchors
        else None
    )
    if other and os.path.exists(other):
        probes += [
            (
                "reference probe, batch of 100",
                "batch",
                [
                    other,
                    "--mode",
                    "batch",
                    "--batch",
                    "100",
                    "--messages",
                    str(n),
                    "--dsn",
                    args.dsn,
                ],
            ),
            (
                "reference probe, 'single' (100 statements per pipeline sync), "
                "2 publishers",
                "single",
                [
                    other,
                    "--mode",
                    "single",
                    "--batch",
                    "100",
                    "--messages",
                    str(n // 2),
                    "--publishers",
                    "2",
                    "--dsn",
                    args.dsn,
                ],
            ),
        ]
    for label, mode, argv in probes:
        if time.monotonic() > deadline:
            break
        r = run_json_script([sys.executable, *argv], 180)
        r.update(
            {
                "kind": "ceiling",
                "label": label,
                "mode": mode,
                "probe": os.path.basename(argv[0]),
            }
        )
        say(f"ceiling {label}: {r.get('publish_rate')}/s {r.get('error', '')}")
        rows.append(r)
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace, elapsed: float) -> str:
    parts = [
        f"Sitting of {elapsed / 60:.1f} min on {os.cpu_count()} cores; ssebench flags "
        f"common to every run: `{' '.join(COMMON)}`.",
        "",
        main_table(rows),
        "",
        extra_table(rows),
        "",
        goals(rows),
        "",
    ]
    sweep = [r for r in rows if r.get("kind") == "sweep"]
    if sweep:
        lines = []
        for r in sweep:
            lines.append(
                [
                    r["system"],
                    fmt_num(r["subs_n"]),
                    "full speed" if r["mode"] == "max" else "10 events/s",
                    fmt_num(r.get("delivery_rate")),
                    f"{(r.get('lat_us_p99') or 0) / 1000:.1f}",
                    fmt_num(r.get("lost")),
                    f"{fmt_num(r.get('server_cpu_pct'))} / "
                    f"{fmt_num(r.get('self_cpu_pct'))}",
                ]
            )
        parts += [
            markdown_table(
                [
                    "system",
                    "subscribers",
                    "publishing",
                    "deliveries/s",
                    "p99 (ms)",
                    "lost",
                    "CPU % server / ssebench",
                ],
                lines,
            ),
            "",
        ]
    commands = sorted(
        {f"{r['system']}: `{r['server_cmd']}`" for r in rows if r.get("server_cmd")}
    )
    parts += ["Servers:", ""] + [f"- {c}" for c in commands] + [""]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
