"""Benchmark runner for ssepg: starts a server, drives it with the load
generator of this directory, and prints one markdown table.

Usage (from the repository root, with ssepg installed)::

    python bench/run.py                                   # in-process broker only
    python bench/run.py --dsn postgresql://user@127.0.0.1/db
    python bench/run.py --dsn ... --modes postgres --workloads W1,W3L
    python bench/run.py --quick                           # smaller runs, ~2 minutes

Every run gets a fresh server (``python -m ssepg`` on 127.0.0.1, a free
port) in one of these modes:

``embedded``   no DSN: the in-process broker.
``postgres``   with the DSN: events go through Postgres LISTEN/NOTIFY.
``processes``  with the DSN and ``--processes N`` (``--procs``, default 2):
               N instances sharing the port.

Workloads (the same definitions as the reference measurements: ~100-byte
events, 8 keep-alive publisher connections, one event per POST unless
stated, publishing as fast as the answers come back):

``W1``     1 topic, 1,000 subscribers, 2,000 events: fan-out rate.
``W2``     100 topics x 10 subscribers, 20,000 events.
``W3L``    1 topic, 100 subscribers, ``--rate`` (100) events/s for 10 s:
           publish-to-receive latency.
``W4``     5,000 idle subscribers over 100 topics, held 20 s: server memory
           per subscriber; ``W4gz`` the same with gzip streams.
``W5``     100 topics, no subscribers, 20,000 single-event POSTs.
``BATCH``  ``POST /topics`` with 1,000 events per request, 100,000 events
           over 100 topics with one subscriber each.
``LIB``    ``await service.publish()`` from 256 tasks in one process, no
           HTTP (``bench/library.py``); with a DSN the table adds the
           Postgres NOTIFY ceiling measured in the same sitting
           (``bench/pg_ceiling.py``, batched and one per transaction).

The CPU columns give percent of one core over the measured window (the
publishing phase, or the hold for W4) for the server (all its
processes), the Postgres backends serving it, the load generator (all
its worker processes), and every other process of the machine (what the
run could not use). When the generator is near one core per worker, or
server and generator together fill the machine, the figure says as much
about the generator as about the server: the notes column flags it.

``--json FILE`` also writes every raw result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    CPUWindow,
    Server,
    backends_of,
    fmt_num,
    free_port,
    markdown_table,
    memory_kib,
    postgres_pids,
    private_database,
    raise_fd_limit,
)
from loadgen import LoadRun, Plan, random_prefix  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

SETTLE_S = 2.0

WORKLOADS: dict[str, dict[str, Any]] = {
    "W1": {"subs": 1000, "topics": 1, "messages": 2000},
    "W2": {"subs": 1000, "topics": 100, "messages": 20000},
    "W3L": {"subs": 100, "topics": 1, "messages": 1000, "rate": 100.0, "drain": 30.0},
    "W4": {"subs": 5000, "topics": 100, "messages": 0, "hold": 20.0},
    "W4gz": {"subs": 5000, "topics": 100, "messages": 0, "hold": 20.0, "gzip": True},
    "W5": {"subs": 0, "topics": 100, "messages": 20000},
    "BATCH": {"subs": 100, "topics": 100, "messages": 100000, "batch": 1000},
    "LIB": {"messages": 200000, "tasks": 256, "topics": 100},
}
DEFAULT_WORKLOADS = "W1,W2,W3L,W4,W4gz,W5,BATCH,LIB"


def _scaled(spec: dict[str, Any], quick: bool) -> dict[str, Any]:
    spec = dict(spec)
    if quick:
        if spec.get("messages") and not spec.get("rate"):
            spec["messages"] = max(100, spec["messages"] // 4)
        if spec.get("rate"):
            spec["messages"] = int(spec["rate"] * 5)
        if spec.get("hold"):
            spec["hold"] = 5.0
    return spec


def run_load(
    mode: str,
    name: str,
    spec: dict[str, Any],
    dsn: str | None,
    processes: int,
    workers: int,
    log_path: str,
) -> dict[str, Any]:
    """One load generator run against a fresh server."""
    port = free_port()
    server = Server(port, dsn=dsn, processes=processes, log_path=log_path)
    hold = float(spec.get("hold", 0.0))
    plan = Plan(
        port=port,
        prefix=random_prefix(),
        workers=workers,
        **{k: v for k, v in spec.items() if k in Plan.__dataclass_fields__},
    )
    multi = processes > 1
    row: dict[str, Any] = {"mode": mode, "workload": name, "server": server.command()}
    server.start()
    try:
        row["mem_kib_before"] = memory_kib(server.pids(), pss=multi)
        run = LoadRun(plan)
        try:
            run.start()
            run.wait_connected()
            time.sleep(SETTLE_S)
            row["mem_kib_connected"] = memory_kib(server.pids(), pss=multi)
            window = CPUWindow()
            window.start(server.pids() + run.pids() + postgres_pids())
            if hold:
                time.sleep(hold)
                row["mem_kib_hold_end"] = memory_kib(server.pids(), pss=multi)
            else:
                run.publish()
                run.finish()
            window.stop_wall()
            row["cpu_window_s"] = round(window.wall_s, 3)
            row["server_cpu_pct"] = window.percent(server.pids())
            row["gen_cpu_pct"] = window.percent(run.pids())
            if dsn:
                row["pg_cpu_pct"] = window.percent(backends_of(dsn, server.pids()))
            row["machine_cpu_pct"] = window.machine_pct
            row["other_cpu_pct"] = round(
                max(
                    0.0,
                    window.machine_pct
                    - row["server_cpu_pct"]
                    - row["gen_cpu_pct"]
                    - (row.get("pg_cpu_pct") or 0.0),
                ),
                1,
            )
            row.update(run.results())
        finally:
            run.close()
    finally:
        server.stop()
    subs = row.get("subs_connected") or 0
    if subs:
        row["mem_kib_per_sub"] = round(
            (row["mem_kib_connected"] - row["mem_kib_before"]) / subs, 2
        )
        if "mem_kib_hold_end" in row:
            row["mem_kib_per_sub_hold"] = round(
                (row["mem_kib_hold_end"] - row["mem_kib_before"]) / subs, 2
            )
    row["memory_kind"] = "PSS" if multi else "RSS"
    return row


def run_script(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run one of the measuring scripts here and decode its JSON line."""
    try:
        out = subprocess.run(
            [sys.executable, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=HERE,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"exceeded {timeout:g} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def run_library(mode: str, spec: dict[str, Any], dsn: str | None) -> dict[str, Any]:
    argv = [
        os.path.join(HERE, "library.py"),
        "--messages",
        str(spec["messages"]),
        "--tasks",
        str(spec["tasks"]),
        "--topics",
        str(spec["topics"]),
    ]
    if dsn:
        argv += ["--dsn", dsn]
    row = run_script(argv, 300)
    row.update({"mode": mode, "workload": "LIB"})
    return row


def run_ceilings(dsn: str, quick: bool) -> list[dict[str, Any]]:
    """The Postgres NOTIFY ceiling, batched and one per transaction."""
    rows = []
    n = 50_000 if quick else 200_000
    for label, extra in (
        ("batch of 100", ["--mode", "batch", "--batch", "100", "--messages", str(n)]),
        (
            "one per transaction, 4 connections",
            ["--mode", "single", "--publishers", "4", "--messages", str(n // 10)],
        ),
    ):
        row = run_script(
            [os.path.join(HERE, "pg_ceiling.py"), "--dsn", dsn, *extra], 180
        )
        row.update({"mode": "postgres", "workload": "CEILING", "label": label})
        rows.append(row)
    return rows


def _notes(row: dict[str, Any], processes: int, workers: int) -> str:
    notes = []
    cores = os.cpu_count() or 1
    server = row.get("server_cpu_pct") or 0.0
    gen = row.get("gen_cpu_pct") or 0.0
    if row.get("error"):
        return "error: " + str(row["error"])
    other = row.get("other_cpu_pct") or 0.0
    total = server + gen + (row.get("pg_cpu_pct") or 0.0) + other
    if row.get("workload") in ("W4", "W4gz", "CEILING"):
        pass
    elif total >= 85 * cores:
        if other >= 25:
            notes.append(f"machine full, other processes took {other:.0f} %")
        else:
            notes.append("machine-bound: server and generator fill every core")
    elif gen >= 85 * max(1, min(workers, cores)):
        notes.append("generator-bound")
    elif server >= 85 * processes:
        notes.append("server-bound")
    if row.get("publish_errors"):
        codes = ", ".join(
            f"{n} x {code}"
            for code, n in sorted((row.get("statuses") or {}).items())
            if not code.startswith("2")
        )
        notes.append(f"{row['publish_errors']} publish errors ({codes or 'no answer'})")
    if row.get("timed_out"):
        notes.append("timed out")
    if row.get("closed_early"):
        notes.append(f"{row['closed_early']} streams closed early")
    fails = sum((row.get("sub_fail") or {}).values())
    if fails:
        notes.append(f"{fails} subscribers failed to connect")
    if row.get("label"):
        notes.append(row["label"])
    if row.get("workload") == "LIB" and row.get("heard") is not None:
        notes.append(f"heard back {fmt_num(row.get('heard_rate'))}/s")
    return "; ".join(notes)


def table(rows: list[dict[str, Any]], processes: int, workers: int) -> str:
    header = [
        "mode",
        "workload",
        "rate (events/s)",
        "latency p50 / p99 (ms)",
        "memory per subscriber (KiB)",
        "delivered / expected, lost, dup, order",
        "CPU % server / Postgres / generator / other",
        "notes",
    ]
    out = []
    for r in rows:
        w = r["workload"]
        if w in ("W5", "LIB", "CEILING") or (
            w == "BATCH" and not r.get("expected_deliveries")
        ):
            rate = fmt_num(r.get("publish_rate")) + " published"
        elif w in ("W4", "W4gz"):
            rate = "-"
        elif w == "BATCH":
            rate = (
                fmt_num(r.get("publish_rate"))
                + " published, "
                + fmt_num(r.get("delivery_rate"))
                + " delivered"
            )
        else:
            rate = fmt_num(r.get("delivery_rate")) + " delivered"
        if r.get("lat_us_p50") is not None:
            lat = f"{r['lat_us_p50'] / 1000:.1f} / {r['lat_us_p99'] / 1000:.1f}"
        else:
            lat = "-"
        if w in ("W4", "W4gz") and r.get("mem_kib_per_sub") is not None:
            mem = (
                f"{r['mem_kib_per_sub']:.1f} ({r['memory_kind']}), "
                f"{r.get('mem_kib_per_sub_hold', 0):.1f} after hold"
            )
        else:
            mem = "-"
        if w in ("LIB", "CEILING"):
            got = r.get("heard", r.get("received"))
            sent = r.get("published", r.get("sent"))
            deliv = f"{fmt_num(got)} / {fmt_num(sent)} heard back"
        elif r.get("expected_deliveries"):
            order = (r.get("out_of_order") or 0) + (r.get("order_mismatch") or 0)
            deliv = (
                f"{fmt_num(r['delivered'])} / {fmt_num(r['expected_deliveries'])}, "
                f"{fmt_num(r['lost'])}, {fmt_num(r['duplicates'])}, {order}"
            )
        elif w == "W5":
            deliv = (
                f"{fmt_num(r.get('published'))} published, "
                f"{r.get('publish_errors')} errors"
            )
        elif w in ("W4", "W4gz"):
            deliv = f"{fmt_num(r.get('subs_connected'))} connected"
        else:
            deliv = "-"
        if w == "LIB":
            cpu = (
                f"{fmt_num(r.get('cpu_pct'))} / {fmt_num(r.get('pg_cpu_pct'))} / - / "
                f"{fmt_num(r.get('other_cpu_pct'))}"
            )
        elif w == "CEILING":
            cpu = "-"
        else:
            keys = ("server_cpu_pct", "pg_cpu_pct", "gen_cpu_pct", "other_cpu_pct")
            cpu = " / ".join(fmt_num(r.get(k)) for k in keys)
        procs = processes if r["mode"] == "processes" else 1
        out.append(
            [r["mode"], w, rate, lat, mem, deliv, cpu, _notes(r, procs, workers)]
        )
    return markdown_table(header, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark ssepg with its own load generator.",
        epilog="See the top of this file for the workloads and columns.",
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL"),
        help="Postgres DSN (default DATABASE_URL); without it only "
        "the embedded mode runs",
    )
    parser.add_argument(
        "--modes",
        default=None,
        help="comma-separated: embedded, postgres, processes "
        "(default: all that the DSN allows)",
    )
    parser.add_argument(
        "--procs",
        type=int,
        default=2,
        help="--processes of the processes mode (default 2)",
    )
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    parser.add_argument("--rate", type=float, default=100.0, help="events/s of W3L")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="subscriber processes of the load generator (default 2)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer events and a 5 s hold, for a first look",
    )
    parser.add_argument("--json", dest="json_path", help="also write raw results here")
    parser.add_argument(
        "--log-dir", help="server logs (default: a temporary directory)"
    )
    parser.add_argument(
        "--shared-db",
        action="store_true",
        help="use the DSN's database as is instead of a private one "
        "created and dropped by the run",
    )
    args = parser.parse_args(argv)

    raise_fd_limit()
    modes = (
        args.modes.split(",")
        if args.modes
        else (["embedded", "postgres", "processes"] if args.dsn else ["embedded"])
    )
    for mode in modes:
        if mode not in ("embedded", "postgres", "processes"):
            parser.error(f"unknown mode {mode!r}")
        if mode != "embedded" and not args.dsn:
            parser.error(f"mode {mode!r} needs --dsn or DATABASE_URL")
    names = args.workloads.split(",")
    for name in names:
        if name not in WORKLOADS:
            parser.error(
                f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}"
            )
    if args.dsn and not args.shared_db:
        with private_database(
            args.dsn, note=lambda text: print(text, file=sys.stderr)
        ) as dsn:
            args.dsn = dsn
            return sitting(args, modes, names)
    return sitting(args, modes, names)


def sitting(args: argparse.Namespace, modes: list[str], names: list[str]) -> int:
    """Every run of the command line, then the table."""
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="ssepg-bench-")
    rows: list[dict[str, Any]] = []
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    started = time.monotonic()
    for mode in modes:
        dsn = args.dsn if mode != "embedded" else None
        processes = args.procs if mode == "processes" else 1
        for name in names:
            spec = _scaled(WORKLOADS[name], args.quick)
            if name == "W3L":
                spec["rate"] = args.rate
                spec["messages"] = int(args.rate * (5 if args.quick else 10))
            if name == "LIB":
                if mode == "processes":
                    continue
                row = run_library(mode, spec, dsn)
            else:
                say(f"{mode} {name} ...")
                try:
                    row = run_load(
                        mode,
                        name,
                        spec,
                        dsn,
                        processes,
                        args.workers,
                        os.path.join(log_dir, f"server-{mode}-{name}.log"),
                    )
                except (RuntimeError, TimeoutError, OSError) as exc:
                    row = {"mode": mode, "workload": name, "error": str(exc)}
            rows.append(row)
            say(
                f"{mode} {name}: "
                + json.dumps(
                    {k: v for k, v in row.items() if not isinstance(v, (dict, list))}
                )
            )
    if args.dsn and "LIB" in names and any(m != "embedded" for m in modes):
        rows.extend(run_ceilings(args.dsn, args.quick))
    if args.json_path:
        with open(args.json_path, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    print(
        f"ssepg benchmark, {os.cpu_count()} cores, generator with {args.workers} "
        f"subscriber processes, {time.monotonic() - started:.0f} s\n"
    )
    print(table(rows, args.procs, args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
