"""The library path: ``await service.publish()`` from many concurrent tasks
inside one process, no HTTP involved.

Starts a `ssepg.Service` (Postgres with ``--dsn``, else the in-process
broker), publishes ``--messages`` events of about 100 bytes round-robin
over ``--topics`` topics from ``--tasks`` tasks, and waits until every
event came back through the broker (own publishes return through Postgres
like everyone else's). Prints one JSON line: ``publish_rate`` (calls
completed per second), ``heard`` and ``heard_rate`` (events back), this
process's CPU and, with Postgres, the CPU of its backends.

Usage::

    python bench/library.py --dsn postgresql://postgres@127.0.0.1/postgres \\
        --messages 200000 --tasks 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import CPUWindow, backends_of, postgres_pids  # noqa: E402

from ssepg import Config, Service  # noqa: E402
from ssepg.errors import SsepgError  # noqa: E402


async def measure(
    dsn: str | None,
    messages: int,
    tasks: int,
    topics: int,
    payload: int,
    timeout: float,
) -> dict[str, Any]:
    config = Config(
        dsn=dsn,
        graceful_drain=0.0,
        ring_capacity=1024,
        # The benchmark's own process may briefly fall behind; nobody
        # subscribes, so this only bounds the windows.
        memory_pressure_threshold=4 << 30,
    )
    service = await Service.start(config)
    try:
        broker: Any = service.broker
        if dsn and not await broker.wait_connected(30):
            raise RuntimeError("the Postgres listener did not connect")
        names = [f"lib{os.getpid()}-{i}" for i in range(topics)]
        pad = "x" * payload
        # Warm up: prepared statements and publish connections.
        await asyncio.gather(*(service.publish(n, {"warm": 1}) for n in names))
        counter = iter(range(messages))
        errors = 0

        async def publisher() -> None:
            nonlocal errors
            for i in counter:
                try:
                    await service.publish(names[i % topics], {"s": i, "pad": pad})
                except SsepgError:
                    errors += 1

        def heard() -> int:
            total = 0
            for name in names:
                t = service.dispatcher.topics.get(name)
                if t is not None:
                    total += t.broadcast
            return total

        await _wait(lambda: heard() >= topics, 10)
        base = heard()
        me = os.getpid()
        window = CPUWindow()
        window.start([me] + postgres_pids())
        started = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(publisher() for _ in range(tasks))), timeout
        )
        published_s = time.perf_counter() - started
        await _wait(lambda: heard() - base >= messages - errors, 15)
        heard_s = time.perf_counter() - started
        window.stop_wall()
        own_cpu = window.percent([me])
        pg_cpu = window.percent(backends_of(dsn, [me])) if dsn else None
        other_cpu = max(0.0, window.machine_pct - own_cpu - (pg_cpu or 0.0))
        got = heard() - base
    finally:
        await service.close(drain=0)
    return {
        "broker": "postgres" if dsn else "memory",
        "messages": messages,
        "tasks": tasks,
        "topics": topics,
        "payload": payload,
        "published": messages - errors,
        "errors": errors,
        "publish_s": round(published_s, 4),
        "publish_rate": round((messages - errors) / published_s, 1),
        "heard": got,
        "heard_s": round(heard_s, 4),
        "heard_rate": round(got / heard_s, 1),
        "lost": max(0, messages - errors - got),
        "cpu_pct": own_cpu,
        "pg_cpu_pct": pg_cpu,
        "other_cpu_pct": round(other_cpu, 1),
    }


async def _wait(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--tasks", type=int, default=1024)
    parser.add_argument("--topics", type=int, default=100)
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--loop",
        choices=["auto", "uvloop", "asyncio"],
        default="auto",
        help="event loop of the measuring process: uvloop when installed "
        "(auto), as python -m ssepg runs, or asyncio's own",
    )
    args = parser.parse_args(argv)
    work = measure(
        args.dsn or None,
        args.messages,
        args.tasks,
        args.topics,
        args.payload,
        args.timeout,
    )
    uvloop = None
    if args.loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if args.loop == "uvloop":
                raise
    result = uvloop.run(work) if uvloop is not None else asyncio.run(work)
    result["loop"] = "uvloop" if uvloop is not None else "asyncio"
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
