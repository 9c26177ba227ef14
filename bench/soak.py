"""Endurance run: many subscribers over many topics for a long time, with
steady publishing and random client churn.

Every minute it prints the server's RSS, the subscriber count, the events
published and delivered, and the events lost. Loss is counted from sequence
numbers: each topic's events carry 1, 2, 3, ... and are published one after
the other, so every subscriber must see them consecutively and in order.

- *lost* counts the holes inside each connection's own life: between its
  first and its last event, and at its start (an event published after the
  stream was registered but never delivered).
- The server's RSS grows while the topics' replay windows fill up (each
  keeps ``ring_capacity`` events); *win_MB* is what the windows hold as
  the server counts it, and *rss-win* the rest (bookkeeping per windowed
  event included), which should stay flat once the windows are full.
- *survivors* are the connections that stayed up from the start of the
  clock to the end, never churned and never closed by the server. After publishing
  stops, each must have received its topic's last event; anything missing
  at the end is added to their loss. This figure must be 0.
- Churned clients reconnect, half of them resuming with ``Last-Event-ID``;
  a resumed stream must continue right after its last event (or announce
  ``ssepg-reset``).

The load generator holds its subscribers on raw non-blocking sockets driven
by ``selectors`` in a few worker processes; one more process publishes over
keep-alive HTTP connections. Its own CPU use is printed next to the server's.

Examples::

    python bench/soak.py --dsn postgresql://postgres@127.0.0.1/soak \\
        --subscribers 2000 --topics 100 --minutes 10
    python bench/soak.py --url http://127.0.0.1:8080 --minutes 5
    python bench/soak.py --minutes 2          # embedded broker, no Postgres
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import json
import multiprocessing as mp
import os
import queue
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

import psutil

STATS_EVERY_S = 2.0

# The per-report table: column names and widths.
COLUMNS = [
    ("min", 5), ("rss_MB", 8), ("drift", 7), ("win_MB", 7), ("rss-win", 7),
    ("subs", 6), ("published", 10), ("delivered", 11), ("/report", 9), ("lost", 5),
    ("surv_lost", 9), ("order", 5), ("dups", 4), ("srv_close", 9), ("churned", 7),
    ("resumed", 7), ("res_break", 9), ("gaps", 4), ("pub_fail", 8), ("gen_cpu%", 8),
    ("srv_cpu%", 8),
]  # fmt: skip


# Subscriber side ----------------------------------------------------------------


@dataclass
class Stream:
    """One SSE connection of a subscriber slot."""

    slot: int
    topic: int
    sock: socket.socket
    resume_seq: int | None  # resumed with Last-Event-ID after this seq
    is_survivor: bool
    state: str = "connecting"
    buf: bytes = b""
    registered_ack: int | None = None
    last_seq: int | None = None
    last_id: bytes | None = None
    closing_by_us: bool = False
    received: int = 0


@dataclass
class WorkerTotals:
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    gaps: int = 0
    resets: int = 0
    resumed: int = 0
    resume_breaks: int = 0
    churned: int = 0
    server_closed: int = 0
    connect_errors: int = 0
    open_streams: int = 0
    survivors: int = 0
    survivor_lost: int = 0
    survivor_tail_lost: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class SubscriberWorker:
    """Holds a share of the subscriber slots on one selector."""

    def __init__(
        self,
        args: dict[str, Any],
        slots: list[int],
        ack: Any,
        survivor_epoch: Any,
        stop: Any,
        finish: Any,
        out: Any,
    ) -> None:
        self.host = args["host"]
        self.port = args["port"]
        self.topics: list[str] = args["topic_names"]
        self.base = args["base_path"]
        self.churn_per_s = args["churn_per_s"]
        self.slots = slots
        self.ack = ack
        self.survivor_epoch = survivor_epoch
        self.stop = stop
        self.finish = finish
        self.out = out
        self.sel = selectors.DefaultSelector()
        self.streams: dict[int, Stream] = {}  # by slot
        self.totals = WorkerTotals()
        self.rng = random.Random(args["seed"] + slots[0])

    def topic_of(self, slot: int) -> int:
        return slot % len(self.topics)

    def open(self, slot: int, resume: Stream | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        rc = sock.connect_ex((self.host, self.port))
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            self.totals.connect_errors += 1
            return
        resume_seq = None
        if resume is not None and resume.last_id is not None:
            resume_seq = resume.last_seq
        stream = Stream(
            slot,
            self.topic_of(slot),
            sock,
            resume_seq,
            is_survivor=resume is None and not self.survivor_epoch.value,
        )
        stream.last_id = resume.last_id if resume_seq is not None and resume else None
        self.streams[slot] = stream
        self.sel.register(sock, selectors.EVENT_WRITE, stream)

    def request(self, stream: Stream) -> bytes:
        path = f"{self.base}/{self.topics[stream.topic]}/events"
        head = (
            f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nAccept: text/event-stream\r\n"
        )
        if stream.resume_seq is not None and stream.last_id is not None:
            head += f"Last-Event-ID: {stream.last_id.decode()}\r\n"
        return (head + "\r\n").encode()

    def close(self, stream: Stream) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(stream.sock)
        stream.sock.close()
        if self.streams.get(stream.slot) is stream:
            del self.streams[stream.slot]

    def on_event(self, stream: Stream, mask: int) -> None:
        if stream.state == "connecting":
            err = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.totals.connect_errors += 1
                self.close(stream)
                self.open(stream.slot)
                return
            # The request is small: one send on a fresh socket takes it.
            stream.sock.send(self.request(stream))
            stream.state = "head"
            self.sel.modify(stream.sock, selectors.EVENT_READ, stream)
            return
        try:
            data = stream.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.totals.server_closed += 1
            self.close(stream)
            # A dropped client comes back, as EventSource does.
            self.open(stream.slot, resume=stream)
            return
        self.feed(stream, data)

    def feed(self, stream: Stream, data: bytes) -> None:
        buf = stream.buf + data
        if stream.state == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                stream.buf = buf
                return
            stream.state = "body"
            buf = buf[end + 4 :]
        frames = buf.split(b"\n\n")
        stream.buf = frames.pop()
        for frame in frames:
            if frame[:4] == b"id: ":
                self.on_data(stream, frame)
            elif frame[:11] == b": listening":
                stream.registered_ack = self.ack[stream.topic]
            elif frame[:13] == b"event: ssepg-":
                if frame[13:16] == b"gap":
                    self.totals.gaps += 1
                else:
                    self.totals.resets += 1
                # Announced: what comes next starts a new run of numbers.
                stream.last_seq = None
                stream.resume_seq = None
                stream.registered_ack = None

    def on_data(self, stream: Stream, frame: bytes) -> None:
        nl = frame.find(b"\n")
        at = frame.find(b'"s":', nl)
        seq = int(frame[at + 4 : frame.find(b",", at)])
        stream.last_id = frame[4:nl]
        stream.received += 1
        totals = self.totals
        totals.delivered += 1
        last = stream.last_seq
        if last is None:
            if stream.resume_seq is not None:
                totals.resumed += 1
                if seq != stream.resume_seq + 1:
                    totals.resume_breaks += 1
                    if seq > stream.resume_seq + 1:
                        self.count_lost(stream, seq - stream.resume_seq - 1)
            elif stream.registered_ack is not None:
                # One publish per topic may have been in flight when the
                # stream was registered; everything after it must arrive.
                missing = seq - (stream.registered_ack + 2)
                if missing > 0:
                    self.count_lost(stream, missing)
            stream.last_seq = seq
            return
        if seq == last + 1:
            stream.last_seq = seq
        elif seq > last + 1:
            self.count_lost(stream, seq - last - 1)
            stream.last_seq = seq
        elif seq == last:
            totals.duplicates += 1
        else:
            totals.out_of_order += 1

    def count_lost(self, stream: Stream, n: int) -> None:
        self.totals.lost += n
        if stream.is_survivor:
            self.totals.survivor_lost += n

    def churn(self, count: int) -> None:
        live = [s for s in self.streams.values() if s.state == "body"]
        for stream in self.rng.sample(live, min(count, len(live))):
            self.totals.churned += 1
            if self.rng.random() < 0.1:
                # Some leave with a reset instead of a FIN.
                stream.sock.setsockopt(
                    socket.SOL_SOCKET,
                    socket.SO_LINGER,
                    b"\x01\x00\x00\x00\x00\x00\x00\x00",
                )
            self.close(stream)
            resume = stream if self.rng.random() < 0.5 else None
            self.open(stream.slot, resume=resume)

    def report(self, final: bool = False) -> None:
        self.totals.open_streams = sum(
            1 for s in self.streams.values() if s.state == "body"
        )
        self.totals.survivors = sum(1 for s in self.streams.values() if s.is_survivor)
        self.out.put((os.getpid(), final, self.totals.as_dict()))

    def run(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Open gradually so that the server's listen backlog never overflows.
        pending = list(self.slots)
        next_report = time.monotonic() + STATS_EVERY_S
        last_tick = time.monotonic()
        churn_due = 0.0
        while not self.finish.is_set():
            if pending:
                for slot in pending[:50]:
                    self.open(slot)
                del pending[:50]
            for key, mask in self.sel.select(timeout=0.05):
                self.on_event(key.data, mask)
            now = time.monotonic()
            if self.survivor_epoch.value and not self.stop.is_set():
                churn_due += self.churn_per_s * (now - last_tick)
                if churn_due >= 1:
                    self.churn(int(churn_due))
                    churn_due -= int(churn_due)
            last_tick = now
            if now >= next_report:
                self.report()
                next_report = now + STATS_EVERY_S
        self.finalize()

    def finalize(self) -> None:
        # Publishing has stopped and settled: a survivor must hold its
        # topic's last event.
        for stream in self.streams.values():
            if not stream.is_survivor:
                continue
            final = self.ack[stream.topic]
            if stream.last_seq is not None:
                tail = final - stream.last_seq
            elif stream.registered_ack is not None:
                tail = final - (stream.registered_ack + 1)
            else:
                tail = 0
            if tail > 0:
                self.totals.survivor_tail_lost += tail
                self.count_lost(stream, tail)
        self.report(final=True)
        for stream in list(self.streams.values()):
            self.close(stream)


def subscriber_main(*params: Any) -> None:
    SubscriberWorker(*params).run()


# Publisher side -------------------------------------------------------------------


def publisher_main(
    args: dict[str, Any], ack: Any, start: Any, stop: Any, out: Any
) -> None:
    """Publishes each topic's events 1, 2, 3, ... in order: a topic belongs
    to one thread, which sends its next event only after the answer to the
    previous one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threads_n = args["publishers"]
    rate_each = args["rate"] / threads_n
    pad = "x" * max(0, args["size"] - 40)
    failures = [0] * threads_n
    published = [0] * threads_n

    def run(k: int) -> None:
        owned = [t for t in range(len(args["topic_names"])) if t % threads_n == k]
        seqs = {t: 0 for t in owned}
        conn = http.client.HTTPConnection(args["host"], args["port"], timeout=30)
        start.wait()
        began = time.monotonic()
        n = 0
        while not stop.is_set():
            due = began + n / rate_each
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            topic = owned[n % len(owned)]
            seq = seqs[topic] + 1
            body = json.dumps({"data": {"s": seq, "t": topic, "p": pad}}).encode()
            path = f"{args['base_path']}/{args['topic_names'][topic]}/events"
            try:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(
                    args["host"], args["port"], timeout=30
                )
            if ok:
                seqs[topic] = seq
                ack[topic] = seq
                published[k] += 1
            else:
                # Retried with the same number: a publish that was answered
                # 503 yet went through shows up as a duplicate, not a hole.
                failures[k] += 1
                time.sleep(0.05)
                continue
            n += 1
        conn.close()

    threads = [
        threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads_n)
    ]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        out.put(
            (
                "publisher",
                False,
                {"published": sum(published), "publish_failures": sum(failures)},
            )
        )
        for thread in threads:
            thread.join(STATS_EVERY_S / len(threads))
    out.put(
        (
            "publisher",
            True,
            {"published": sum(published), "publish_failures": sum(failures)},
        )
    )


# The run ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch_health(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url + "/healthz?limit=0", timeout=10) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())  # type: ignore[no-any-return]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "ssepg",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--graceful-drain",
        "1",
    ]
    if args.dsn:
        command += ["--dsn", args.dsn]
    command += args.server_option
    log = open(args.server_log, "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(command, stdout=log, stderr=log)


@dataclass
class Cpu:
    """CPU seconds of a set of processes, sampled at each report."""

    procs: list[psutil.Process]
    last: float = 0.0
    at: float = field(default_factory=time.monotonic)

    def total(self) -> float:
        seconds = 0.0
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                seconds += times.user + times.system
        return seconds

    def percent(self) -> float:
        now, total = time.monotonic(), self.total()
        share = 100.0 * (total - self.last) / max(1e-6, now - self.at)
        self.last, self.at = total, now
        return share


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080")
    target.add_argument("--dsn", help="start a server on this Postgres database")
    parser.add_argument("--subscribers", type=int, default=2000)
    parser.add_argument("--topics", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--size", type=int, default=200, help="bytes per event")
    parser.add_argument(
        "--churn", type=float, default=200.0, help="clients replaced per minute"
    )
    parser.add_argument("--workers", type=int, default=2, help="subscriber processes")
    parser.add_argument(
        "--publishers", type=int, default=4, help="publishing connections"
    )
    parser.add_argument(
        "--report", type=float, default=60.0, help="seconds between lines"
    )
    parser.add_argument("--server-log", default="soak-server.log")
    parser.add_argument(
        "--server-option",
        action="append",
        default=[],
        help="passed to the server started here (repeatable), "
        "e.g. --server-option=--ring-capacity=256",
    )
    args = parser.parse_args()

    server = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args, port)
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    deadline = time.monotonic() + 60
    while True:
        try:
            if fetch_health(url).get("status") == "ok":
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            print("server did not become healthy within 60 s", file=sys.stderr)
            return 1
        time.sleep(0.2)
    health = fetch_health(url)
    server_proc = psutil.Process(server.pid) if server else None

    run_id = uuid.uuid4().hex[:6]
    shared = {
        "host": host,
        "port": port,
        "base_path": "/topics",
        "topic_names": [f"soak-{run_id}-{i}" for i in range(args.topics)],
        "churn_per_s": args.churn / 60.0 / args.workers,
        "rate": args.rate,
        "size": args.size,
        "publishers": args.publishers,
        "seed": random.randrange(1 << 30),
    }
    ctx = mp.get_context("fork")
    ack = ctx.Array("q", args.topics, lock=False)
    survivor_epoch = ctx.Value("b", 0, lock=False)
    start, stop, finish = ctx.Event(), ctx.Event(), ctx.Event()
    out: Any = ctx.Queue()
    workers = []
    for w in range(args.workers):
        slots = list(range(w, args.subscribers, args.workers))
        proc = ctx.Process(
            target=subscriber_main,
            daemon=True,
            args=(shared, slots, ack, survivor_epoch, stop, finish, out),
        )
        proc.start()
        workers.append(proc)
    publisher = ctx.Process(
        target=publisher_main, daemon=True, args=(shared, ack, start, stop, out)
    )
    publisher.start()

    latest: dict[Any, dict[str, int]] = {}
    finals: set[Any] = set()

    def drain(block_s: float = 0.0) -> None:
        end = time.monotonic() + block_s
        while True:
            try:
                who, final, stats = out.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return
            latest[who] = stats
            if final:
                finals.add(who)

    def total(name: str) -> int:
        return sum(s.get(name, 0) for s in latest.values())

    # Connect everyone before the clock starts.
    connect_deadline = time.monotonic() + 120
    while time.monotonic() < connect_deadline:
        drain(0.5)
        if total("open_streams") >= args.subscribers:
            break
    subs = fetch_health(url)["totals"]["subscribers"]
    print(
        f"server {url} broker={health.get('broker')} "
        f"python={health.get('python_version')}; {args.subscribers} subscribers"
        f" on {args.topics} topics, {subs} registered;"
        f" {args.rate:g} events/s of {args.size} B, churn {args.churn:g}/min,"
        f" {args.workers} subscriber processes + 1 publisher process",
        flush=True,
    )
    loadgen = Cpu([psutil.Process(p.pid) for p in workers + [publisher]])
    server_cpu = Cpu([server_proc] if server_proc else [])
    loadgen.percent()
    server_cpu.percent()
    survivor_epoch.value = 1  # from now on churn; new connections are not survivors
    start.set()
    began = time.monotonic()
    header = " ".join(f"{name:>{width}}" for name, width in COLUMNS)
    print(header, flush=True)
    rss_first: int | None = None
    rss_values: list[int] = []
    rest_values: list[int] = []  # RSS minus what the replay windows hold
    delivered_before = 0
    minute = 0
    interrupted = False
    try:
        while time.monotonic() - began < args.minutes * 60:
            next_line = began + (minute + 1) * args.report
            while time.monotonic() < min(next_line, began + args.minutes * 60):
                drain(min(1.0, max(0.0, next_line - time.monotonic())))
            minute += 1
            report = fetch_health(url)
            rss = server_proc.memory_info().rss if server_proc else report["rss_bytes"]
            window = report["totals"]["total_memory_usage_bytes"]
            rss_values.append(rss)
            rest_values.append(rss - window)
            if rss_first is None:
                rss_first = rss
            delivered = total("delivered")
            row = [
                f"{minute * args.report / 60:.1f}",
                f"{rss / 1e6:.1f}",
                f"{(rss - rss_first) / 1e6:+.1f}",
                f"{window / 1e6:.1f}",
                f"{(rss - window) / 1e6:.1f}",
                report["totals"]["subscribers"],
                total("published"),
                delivered,
                delivered - delivered_before,
                total("lost"),
                total("survivor_lost"),
                total("out_of_order"),
                total("duplicates"),
                total("server_closed"),
                total("churned"),
                total("resumed"),
                total("resume_breaks"),
                total("gaps"),
                total("publish_failures"),
                f"{loadgen.percent():.1f}",
                f"{server_cpu.percent():.1f}" if server_proc else "-",
            ]
            line = " ".join(f"{v:>{w}}" for v, (_, w) in zip(row, COLUMNS, strict=True))
            print(line, flush=True)
            delivered_before = delivered
    except KeyboardInterrupt:
        interrupted = True
    stop.set()
    publisher.join(30)
    # Let the last events reach everyone, then count what survivors miss.
    time.sleep(3.0)
    finish.set()
    deadline = time.monotonic() + 60
    while len(finals) < len(workers) + 1 and time.monotonic() < deadline:
        drain(0.5)
    for proc in workers:
        proc.join(10)
    report = fetch_health(url)
    print(
        f"end{' (interrupted)' if interrupted else ''}: "
        f"published {total('published')}, delivered {total('delivered')}, "
        f"lost {total('lost')} (survivors: {total('survivors')} connections, "
        f"lost {total('survivor_lost')}, of which at the end "
        f"{total('survivor_tail_lost')}), out of order {total('out_of_order')}, "
        f"duplicates {total('duplicates')}, closed by the server "
        f"{total('server_closed')}, resumed {total('resumed')} "
        f"(breaks {total('resume_breaks')}, resets {total('resets')}), "
        f"gaps {total('gaps')}, server dropped_clients "
        f"{report['totals']['dropped_clients']}",
        flush=True,
    )
    if rss_values:
        mb = [v / 1e6 for v in rss_values]
        rest = [v / 1e6 for v in rest_values]
        print(
            f"server RSS: first report {mb[0]:.1f} MB, last {mb[-1]:.1f} MB, "
            f"min {min(mb):.1f}, max {max(mb):.1f}, drift {mb[-1] - mb[0]:+.1f} MB; "
            f"without the replay windows: first {rest[0]:.1f} MB, last "
            f"{rest[-1]:.1f} MB, drift {rest[-1] - rest[0]:+.1f} MB",
            flush=True,
        )
    if server is not None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0 if total("survivor_lost") == 0 and total("out_of_order") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
