"""How many notifications per second Postgres itself takes and delivers on
this machine: the ceiling for any publisher that goes through NOTIFY.

One listener process LISTENs on a private channel and counts; publisher
processes send ``--messages`` notifications in total, each payload unique
(Postgres folds identical payloads within one transaction). Modes:

``batch``
    ``--batch`` notifications per statement and transaction
    (``pg_notify`` over an ``unnest`` of an array): what a publisher that
    coalesces concurrent events can reach.
``pipelined``
    one ``pg_notify`` statement per notification, ``--batch`` statements
    sent back to back in pipeline mode; they share one implicit
    transaction up to the sync that ends the group.
``single``
    one statement and one transaction per notification, each waited for:
    one round trip per event, ``--publishers`` connections in parallel.

Prints one JSON line: ``publish_rate`` (notifications accepted per second),
``recv_rate`` (received by the listener per second, from the first send),
``received`` and ``lat_us_p50/p99`` (send to receive, sampled).

Usage::

    python bench/pg_ceiling.py --dsn postgresql://postgres@127.0.0.1/postgres \\
        --mode batch --batch 100 --messages 200000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

import psycopg


def _listen(
    dsn: str, channel: str, expected: int, timeout: float, ctl: Connection
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'LISTEN "{channel}"')
        ctl.send("listening")
        got = 0
        first = last = 0
        samples: list[int] = []
        # Sample about 10,000 latencies whatever the message count.
        every = max(1, expected // 10000)
        deadline = time.monotonic() + timeout
        while got < expected and time.monotonic() < deadline:
            for note in conn.notifies(timeout=0.5, stop_after=4096):
                now = time.monotonic_ns()
                got += 1
                if not first:
                    first = now
                last = now
                if got % every == 0:
                    sent_ns = int(note.payload.split(":", 2)[1])
                    samples.append((now - sent_ns) // 1000)
        ctl.send(
            {"received": got, "first_ns": first, "last_ns": last, "samples": samples}
        )


def _publish(
    dsn: str,
    channel: str,
    mode: str,
    batch: int,
    first: int,
    count: int,
    payload: int,
    timeout: float,
    go: Any,
    ctl: Connection,
) -> None:
    # "seq:ts:" takes about 25 bytes of the payload.
    pad = "x" * max(0, payload - 25)
    with psycopg.connect(dsn, autocommit=True) as conn:
        go.wait(30)
        start = time.monotonic_ns()
        deadline = time.monotonic() + timeout
        sent = 0
        seq = first
        stop = first + count
        if mode == "batch":
            query = "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS u(p)"
            while seq < stop and time.monotonic() < deadline:
                n = min(batch, stop - seq)
                ts = time.monotonic_ns()
                payloads = [f"{k}:{ts}:{pad}" for k in range(seq, seq + n)]
                conn.execute(query, (channel, payloads), prepare=True)
                seq += n
                sent += n
        elif mode == "pipelined":
            query = "SELECT pg_notify(%s, %s)"
            while seq < stop and time.monotonic() < deadline:
                n = min(batch, stop - seq)
                with conn.pipeline(), conn.cursor() as cur:
                    for k in range(seq, seq + n):
                        cur.execute(
                            query,
                            (channel, f"{k}:{time.monotonic_ns()}:{pad}"),
                            prepare=True,
                        )
                seq += n
                sent += n
        else:
            query = "SELECT pg_notify(%s, %s)"
            while seq < stop and time.monotonic() < deadline:
                conn.execute(
                    query, (channel, f"{seq}:{time.monotonic_ns()}:{pad}"), prepare=True
                )
                seq += 1
                sent += 1
        ctl.send({"sent": sent, "start_ns": start, "end_ns": time.monotonic_ns()})


def measure(
    dsn: str,
    mode: str = "batch",
    batch: int = 100,
    messages: int = 200_000,
    publishers: int = 1,
    payload: int = 100,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Run one probe and return its figures (see the module docstring)."""
    ctx = mp.get_context("fork")
    channel = "ceiling_" + uuid.uuid4().hex[:12]
    lparent, lchild = ctx.Pipe()
    listener = ctx.Process(
        target=_listen, args=(dsn, channel, messages, timeout + 15, lchild), daemon=True
    )
    listener.start()
    procs = [listener]
    try:
        if not lparent.poll(20) or lparent.recv() != "listening":
            raise RuntimeError("the listener did not start")
        go = ctx.Event()
        pubs = []
        share = -(-messages // publishers)
        for i in range(publishers):
            first = i * share
            count = max(0, min(share, messages - first))
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_publish,
                args=(
                    dsn,
                    channel,
                    mode,
                    batch,
                    first,
                    count,
                    payload,
                    timeout,
                    go,
                    child,
                ),
                daemon=True,
            )
            p.start()
            procs.append(p)
            pubs.append(parent)
        # Connections first, then everyone starts together.
        time.sleep(0.5)
        go.set()
        results = []
        for parent in pubs:
            if not parent.poll(timeout + 30):
                raise RuntimeError("a publisher did not finish")
            results.append(parent.recv())
        if not lparent.poll(timeout + 30):
            raise RuntimeError("the listener did not finish")
        heard = lparent.recv()
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    sent = sum(r["sent"] for r in results)
    start = min(r["start_ns"] for r in results)
    end = max(r["end_ns"] for r in results)
    publish_s = (end - start) / 1e9
    recv_s = (heard["last_ns"] - start) / 1e9 if heard["last_ns"] else 0.0
    samples = sorted(heard["samples"])
    return {
        "mode": mode,
        "batch": batch,
        "publishers": publishers,
        "messages": messages,
        "payload": payload,
        "sent": sent,
        "received": heard["received"],
        "publish_s": round(publish_s, 4),
        "publish_rate": round(sent / publish_s, 1) if publish_s else 0,
        "recv_rate": round(heard["received"] / recv_s, 1) if recv_s else 0,
        "lat_us_p50": samples[len(samples) // 2] if samples else None,
        "lat_us_p99": samples[min(len(samples) - 1, int(0.99 * len(samples)))]
        if samples
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    parser.add_argument(
        "--mode", choices=["batch", "pipelined", "single"], default="batch"
    )
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--publishers", type=int, default=1)
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if not args.dsn:
        parser.error("give --dsn or set DATABASE_URL")
    result = measure(
        args.dsn,
        args.mode,
        max(1, args.batch),
        args.messages,
        max(1, args.publishers),
        args.payload,
        args.timeout,
    )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
