"""The load generator of the ssepg benchmarks.

Subscribers and publishers are raw non-blocking sockets driven by epoll,
spread over worker processes so that the generator can use more than one
core: ``workers`` processes hold the SSE subscribers, one more process runs
the keep-alive publisher connections.

What is measured, and how:

- A subscriber is connected once it got a 200 answer with
  ``Content-Type: text/event-stream``. Identity, chunked and gzip bodies are
  decoded; CR and CRLF line ends are turned into LF before parsing.
- Each published event carries ``{"t": topic index, "s": sequence number of
  the event within its topic, "c": publisher connection, "ts":
  CLOCK_MONOTONIC ns when the request was built, "pad": "x..."}``. An event
  counts when a complete event (ended by a blank line) has a ``data:`` line
  that starts with this object for the subscriber's own topic.
- Latency is the receive time minus ``ts`` (the clock is shared by all
  processes of the machine). Loss, duplicates and order come from ``s``:
  one byte per expected event and subscriber marks what arrived; events of
  one publisher connection must arrive in the order it sent them (it sends
  the next request only after the previous answer); and every subscriber of
  a topic that got everything must have seen the same order (compared with
  a hash of the sequence numbers in arrival order).
- A stream that ends before the run does is counted as closed early.

`LoadRun` drives one run from the parent process; ``run.py`` wraps it with
a server, CPU sampling and the table.
"""

from __future__ import annotations

import array
import contextlib
import errno
import multiprocessing as mp
import os
import random
import re
import select
import socket
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

RECV_BYTES = 65536
ORDER_HASH_MASK = (1 << 61) - 1


@dataclass
class Plan:
    """One run: who connects, what is published, and the bounds."""

    host: str = "127.0.0.1"
    port: int = 8080
    base_path: str = "/topics"
    prefix: str = "bench"
    subs: int = 0
    topics: int = 1
    messages: int = 0
    payload: int = 64
    pub_conns: int = 8
    rate: float = 0.0
    batch: int = 0
    gzip: bool = False
    workers: int = 2
    connect_rate: float = 2000.0
    connect_inflight: int = 256
    connect_timeout: float = 60.0
    timeout: float = 120.0
    drain: float = 10.0

    def topic(self, index: int) -> str:
        return f"{self.prefix}{index}"

    @property
    def per_topic(self) -> int:
        """Most events any one topic gets (message i goes to topic i % T)."""
        return -(-self.messages // self.topics) if self.messages else 0


class _Sub:
    """One subscriber connection and what it has received."""

    __slots__ = (
        "sock",
        "fd",
        "topic",
        "state",
        "head",
        "is_chunked",
        "chunk_left",
        "chunk_buf",
        "inflate",
        "has_cr",
        "held_cr",
        "buf",
        "seen",
        "last_by_conn",
        "count",
        "order_hash",
        "is_closed",
        "pattern",
    )

    def __init__(
        self, sock: socket.socket, topic: int, plan: Plan, pattern: Any
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.topic = topic
        self.state = 0  # 0 connecting, 1 reading the head, 2 streaming
        self.head = b""
        self.is_chunked = False
        self.chunk_left = 0  # >0 data bytes left, 0 size line next, -1 CRLF next
        self.chunk_buf = b""
        self.inflate: Any = None
        self.has_cr = False
        self.held_cr = False
        self.buf = b""
        self.seen = bytearray(plan.per_topic)
        self.last_by_conn = [-1] * max(1, plan.pub_conns)
        self.count = 0
        self.order_hash = 0
        self.is_closed = False
        self.pattern = pattern


def _dechunk(sub: _Sub, data: bytes) -> bytes:
    """Strip ``Transfer-Encoding: chunked`` framing, keeping partial state
    in *sub* between reads."""
    buf = sub.chunk_buf + data if sub.chunk_buf else data
    out = []
    pos = 0
    n = len(buf)
    while pos < n:
        left = sub.chunk_left
        if left > 0:
            take = min(left, n - pos)
            out.append(buf[pos : pos + take])
            pos += take
            sub.chunk_left = left - take or -1
        elif left == -1:
            # The CRLF after a chunk's data.
            if n - pos < 2:
                break
            pos += 2
            sub.chunk_left = 0
        else:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0].strip() or b"0", 16)
            pos = eol + 2
            if size == 0:
                # The last chunk: the body is over.
                sub.is_closed = True
                pos = n
                break
            sub.chunk_left = size
    sub.chunk_buf = buf[pos:]
    return b"".join(out)


def _normalize_line_ends(sub: _Sub, data: bytes) -> bytes:
    # A CR at the end of a read may be the first half of a CRLF: hold it.
    if sub.held_cr:
        data = b"\r" + data
        sub.held_cr = False
    if data.endswith(b"\r"):
        data = data[:-1]
        sub.held_cr = True
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


class _SubWorker:
    """The subscribers of one worker process (runs in the child)."""

    def __init__(
        self, plan: Plan, indices: list[int], ctl: Connection, worker: int
    ) -> None:
        self.plan = plan
        self.ctl = ctl
        self.indices = indices
        self.worker = worker
        self.ep = select.epoll()
        self.subs: dict[int, _Sub] = {}
        self.all_subs: list[_Sub] = []
        self.patterns = [
            re.compile(
                rb'^data: ?\{"t":%d,"s":(\d+),"c":(\d+),"ts":(\d+),' % t, re.MULTILINE
            )
            for t in range(plan.topics)
        ]
        gz = b"Accept-Encoding: gzip\r\n" if plan.gzip else b""
        host = f"{plan.host}:{plan.port}".encode()
        self.requests = [
            b"GET %s/%s/events HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\n%s\r\n"
            % (plan.base_path.encode(), plan.topic(t).encode(), host, gz)
            for t in range(plan.topics)
        ]
        self.fail = {"connect": 0, "status": 0, "ctype": 0, "closed": 0, "timeout": 0}
        self.connected = 0
        self.opening = 0
        self.closed_early = 0
        self.delivered = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.invalid = 0
        self.proto_errors = 0
        self.bytes_rx = 0
        self.first_ns = 0
        self.last_ns = 0
        self.lat = array.array("q")
        self.pending: int | None = None  # deliveries still expected after finish
        self.expected: list[int] = []

    # Connecting ---------------------------------------------------------------

    def _open(self, index: int) -> None:
        plan = self.plan
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        topic = index % plan.topics
        sub = _Sub(sock, topic, plan, self.patterns[topic])
        self.all_subs.append(sub)
        err = sock.connect_ex((plan.host, plan.port))
        if err not in (0, errno.EINPROGRESS):
            self.fail["connect"] += 1
            sub.is_closed = True
            sock.close()
            return
        self.subs[sub.fd] = sub
        self.opening += 1
        self.ep.register(sub.fd, select.EPOLLOUT)

    def _on_connected(self, sub: _Sub) -> None:
        err = sub.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(sub, "connect")
            return
        try:
            sub.sock.send(self.requests[sub.topic])
        except OSError:
            self._fail(sub, "connect")
            return
        sub.state = 1
        self.ep.modify(sub.fd, select.EPOLLIN)

    def _fail(self, sub: _Sub, cause: str) -> None:
        self.fail[cause] += 1
        self._drop(sub)

    def _drop(self, sub: _Sub) -> None:
        if sub.state < 2 and not sub.is_closed:
            self.opening -= 1
        sub.is_closed = True
        self.subs.pop(sub.fd, None)
        with contextlib.suppress(OSError):
            self.ep.unregister(sub.fd)
        sub.sock.close()

    def _on_head(self, sub: _Sub, data: bytes) -> None:
        head = sub.head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > 65536:
                self._fail(sub, "status")
            else:
                sub.head = head
            return
        sub.head = b""
        lines = head[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            self._fail(sub, "status")
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if not headers.get("content-type", "").startswith("text/event-stream"):
            self._fail(sub, "ctype")
            return
        sub.is_chunked = "chunked" in headers.get("transfer-encoding", "")
        if headers.get("content-encoding", "") == "gzip":
            sub.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        sub.state = 2
        self.opening -= 1
        self.connected += 1
        rest = head[end + 4 :]
        if rest:
            self._on_body(sub, rest, time.monotonic_ns())

    # Streaming ----------------------------------------------------------------

    def _on_body(self, sub: _Sub, data: bytes, now: int) -> None:
        if sub.is_chunked:
            data = _dechunk(sub, data)
        if sub.inflate is not None and data:
            try:
                data = sub.inflate.decompress(data)
            except zlib.error:
                self._closed(sub)
                return
        if sub.has_cr or b"\r" in data:
            sub.has_cr = True
            data = _normalize_line_ends(sub, data)
        buf = sub.buf + data if sub.buf else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            sub.buf = buf
            return
        sub.buf = buf[end + 2 :]
        found = sub.pattern.findall(buf, 0, end + 2)
        if not found:
            return
        seen = sub.seen
        last = sub.last_by_conn
        lat = self.lat
        h = sub.order_hash
        fresh = 0
        for seq_b, conn_b, ts_b in found:
            s = int(seq_b)
            if s >= len(seen):
                self.invalid += 1
                continue
            if seen[s]:
                self.duplicates += 1
                continue
            seen[s] = 1
            fresh += 1
            c = int(conn_b)
            if c < len(last):
                if s < last[c]:
                    self.out_of_order += 1
                last[c] = s
            h = (h * 1000003 + s) & ORDER_HASH_MASK
            lat.append(now - int(ts_b))
        sub.order_hash = h
        sub.count += fresh
        self.delivered += fresh
        if fresh:
            if not self.first_ns:
                self.first_ns = now
            self.last_ns = now
            if self.pending is not None:
                self.pending -= fresh

    def _closed(self, sub: _Sub) -> None:
        if sub.state == 2:
            self.closed_early += 1
            if self.pending is not None:
                self.pending -= max(0, self.expected[sub.topic] - sub.count)
        else:
            self.fail["closed"] += 1
        self._drop(sub)

    def _on_readable(self, sub: _Sub) -> None:
        try:
            data = sub.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._closed(sub)
            return
        self.bytes_rx += len(data)
        if sub.state == 2:
            try:
                self._on_body(sub, data, time.monotonic_ns())
            except ValueError:
                # A chunk size that is not hexadecimal: the framing is broken.
                self.proto_errors += 1
                sub.is_closed = True
            if sub.is_closed and sub.fd in self.subs:
                self._closed(sub)
        else:
            self._on_head(sub, data)

    # Control ------------------------------------------------------------------

    def _poll(self, timeout: float) -> None:
        subs = self.subs
        for fd, mask in self.ep.poll(timeout, 1024):
            sub = subs.get(fd)
            if sub is None:
                continue
            if sub.state == 2 or sub.state == 1:
                if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._on_readable(sub)
            elif mask & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                self._on_connected(sub)

    def connect_all(self) -> None:
        plan = self.plan
        rate = plan.connect_rate / max(1, plan.workers)
        inflight = max(1, plan.connect_inflight // max(1, plan.workers))
        todo = self.indices
        t0 = time.monotonic()
        deadline = t0 + plan.connect_timeout
        started = 0
        while time.monotonic() < deadline:
            allowed = int((time.monotonic() - t0) * rate) + 1 - started
            while started < len(todo) and allowed > 0 and self.opening < inflight:
                self._open(todo[started])
                started += 1
                allowed -= 1
            if started >= len(todo) and self.opening == 0:
                break
            self._poll(0.005 if started < len(todo) else 0.05)
        for sub in list(self.subs.values()):
            if sub.state < 2:
                self._fail(sub, "timeout")

    def serve(self) -> None:
        self.connect_all()
        self.ctl.send(("connected", {"connected": self.connected, "fail": self.fail}))
        # The control pipe wakes the poll; its fd is not in self.subs.
        self.ep.register(self.ctl.fileno(), select.EPOLLIN)
        deadline: float | None = None
        while True:
            if self.ctl.poll(0):
                msg = self.ctl.recv()
                if msg[0] == "finish":
                    self.expected = msg[1]
                    deadline = time.monotonic() + msg[2]
                    alive = [
                        s for s in self.all_subs if s.state == 2 and not s.is_closed
                    ]
                    self.pending = sum(
                        max(0, self.expected[s.topic] - s.count) for s in alive
                    )
                elif msg[0] == "stop":
                    break
            if self.pending is not None and (
                self.pending <= 0
                or (deadline is not None and time.monotonic() >= deadline)
            ):
                self.ctl.send(("done", {"timed_out": self.pending > 0}))
                self.pending = None
                deadline = None
                self._wait_stop()
                break
            self._poll(0.05)
        self._report()

    def _wait_stop(self) -> None:
        # Keep the streams open (and read) until the parent has sampled CPU
        # and memory and asks for the figures.
        while not self.ctl.poll(0):
            self._poll(0.05)
        self.ctl.recv()

    def _report(self) -> None:
        orders: dict[int, dict[int, int]] = {}
        for s in self.all_subs:
            if s.state == 2 and self.expected and s.count >= self.expected[s.topic]:
                by_hash = orders.setdefault(s.topic, {})
                by_hash[s.order_hash] = by_hash.get(s.order_hash, 0) + 1
        still_open = sum(1 for s in self.all_subs if s.state == 2 and not s.is_closed)
        self.ctl.send(
            (
                "results",
                {
                    "connected": self.connected,
                    "fail": self.fail,
                    "closed_early": self.closed_early,
                    "still_open": still_open,
                    "delivered": self.delivered,
                    "duplicates": self.duplicates,
                    "out_of_order": self.out_of_order,
                    "invalid": self.invalid,
                    "proto_errors": self.proto_errors,
                    "bytes_rx": self.bytes_rx,
                    "first_ns": self.first_ns,
                    "last_ns": self.last_ns,
                    "orders": orders,
                    "received_by_topic": _sum_by_topic(self.all_subs, self.plan.topics),
                    "subs_by_topic": _subs_by_topic(self.all_subs, self.plan.topics),
                    "lat": self.lat.tobytes(),
                },
            )
        )
        for s in list(self.subs.values()):
            self._drop(s)


def _sum_by_topic(subs: list[_Sub], topics: int) -> list[int]:
    out = [0] * topics
    for s in subs:
        out[s.topic] += s.count
    return out


def _subs_by_topic(subs: list[_Sub], topics: int) -> list[int]:
    out = [0] * topics
    for s in subs:
        if s.state == 2:
            out[s.topic] += 1
    return out


def _sub_worker_main(
    plan: Plan, indices: list[int], ctl: Connection, worker: int
) -> None:
    _raise_nofile()
    w = _SubWorker(plan, indices, ctl, worker)
    with contextlib.suppress(EOFError, BrokenPipeError, KeyboardInterrupt):
        w.serve()


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _PubConn:
    __slots__ = ("sock", "fd", "index", "out", "inbuf", "busy", "items")

    def __init__(self, sock: socket.socket, index: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.index = index
        self.out = b""
        self.inbuf = b""
        self.busy = False
        self.items: list[int] = []  # topic of each event in the request in flight


_RESULT_KIND = re.compile(rb'\{"(topic|error)"')


class _Publisher:
    """The publisher connections (runs in the child)."""

    def __init__(self, plan: Plan, ctl: Connection) -> None:
        self.plan = plan
        self.ctl = ctl
        self.ep = select.epoll()
        self.conns: dict[int, _PubConn] = {}
        self.ok_by_topic = [0] * plan.topics
        self.errors = 0
        self.conn_errors = 0
        self.requests = 0
        self.statuses: dict[str, int] = {}
        self.next_index = 0
        self.first_ns = 0
        self.last_ns = 0
        self.pad = "x" * plan.payload
        self.host = f"{plan.host}:{plan.port}"
        self.urls = [
            f"{plan.base_path}/{plan.topic(t)}/events" for t in range(plan.topics)
        ]

    def _connect(self, index: int) -> _PubConn | None:
        try:
            sock = socket.create_connection(
                (self.plan.host, self.plan.port), timeout=10
            )
        except OSError:
            self.conn_errors += 1
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = _PubConn(sock, index)
        self.conns[conn.fd] = conn
        self.ep.register(conn.fd, select.EPOLLIN)
        return conn

    def _data(self, i: int, conn: int, ts: int) -> str:
        topics = self.plan.topics
        # Key order matters: the subscribers' pattern expects t, s, c, ts.
        return '{"t":%d,"s":%d,"c":%d,"ts":%d,"pad":"%s"}' % (  # noqa: UP031
            i % topics,
            i // topics,
            conn,
            ts,
            self.pad,
        )

    def _send_next(self, conn: _PubConn) -> bool:
        plan = self.plan
        if self.next_index >= plan.messages:
            return False
        i = self.next_index
        ts = time.monotonic_ns()
        if plan.batch:
            n = min(plan.batch, plan.messages - i)
            parts = []
            items = []
            for k in range(i, i + n):
                t = k % plan.topics
                items.append(t)
                data = self._data(k, conn.index, ts)
                parts.append(f'{{"topic":"{plan.topic(t)}","data":{data}}}')
            body = ('{"events":[' + ",".join(parts) + "]}").encode()
            path = plan.base_path
            self.next_index += n
        else:
            t = i % plan.topics
            items = [t]
            body = ('{"data":' + self._data(i, conn.index, ts) + "}").encode()
            path = self.urls[t]
            self.next_index += 1
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        conn.items = items
        conn.busy = True
        conn.out = head + body
        if not self.first_ns:
            self.first_ns = ts
        self._flush(conn)
        return True

    def _flush(self, conn: _PubConn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._lost(conn)
            return
        conn.out = conn.out[sent:]
        self.ep.modify(conn.fd, select.EPOLLIN | (select.EPOLLOUT if conn.out else 0))

    def _lost(self, conn: _PubConn) -> None:
        # The request in flight is not retried: it may have been published.
        self.conn_errors += 1
        if conn.busy:
            self.errors += len(conn.items)
        self.conns.pop(conn.fd, None)
        with contextlib.suppress(OSError):
            self.ep.unregister(conn.fd)
        conn.sock.close()
        self._connect(conn.index)

    def _on_readable(self, conn: _PubConn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost(conn)
            return
        buf = conn.inbuf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].decode("latin-1")
            length = 0
            keep_alive = True
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    keep_alive = False
            if len(buf) < end + 4 + length:
                break
            body = buf[end + 4 : end + 4 + length]
            buf = buf[end + 4 + length :]
            status = head[9:12]
            self._answered(conn, status, body)
            if not keep_alive:
                conn.inbuf = b""
                self._lost(conn)
                return
        conn.inbuf = buf

    def _answered(self, conn: _PubConn, status: str, body: bytes) -> None:
        self.requests += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.last_ns = time.monotonic_ns()
        items = conn.items
        conn.busy = False
        conn.items = []
        if not status.startswith("2"):
            self.errors += len(items)
            return
        if self.plan.batch:
            kinds = _RESULT_KIND.findall(body)
            for t, kind in zip(items, kinds, strict=False):
                if kind == b"topic":
                    self.ok_by_topic[t] += 1
                else:
                    self.errors += 1
            self.errors += max(0, len(items) - len(kinds))
        else:
            self.ok_by_topic[items[0]] += 1

    def run(self) -> None:
        plan = self.plan
        for index in range(plan.pub_conns):
            self._connect(index)
        self.ctl.send(("ready", {"connections": len(self.conns)}))
        msg = self.ctl.recv()
        if msg[0] != "go":
            return
        t0 = time.monotonic()
        deadline = t0 + plan.timeout
        per_request = plan.batch or 1
        while time.monotonic() < deadline:
            now = time.monotonic()
            wait = 0.05
            for conn in list(self.conns.values()):
                if conn.busy or self.next_index >= plan.messages:
                    continue
                if plan.rate > 0:
                    due = t0 + self.next_index / plan.rate
                    if due > now:
                        wait = min(wait, due - now)
                        continue
                self._send_next(conn)
            busy = any(c.busy for c in self.conns.values())
            if self.next_index >= plan.messages and not busy:
                break
            if not self.conns:
                break
            for fd, mask in self.ep.poll(wait, 64):
                ready = self.conns.get(fd)
                if ready is None:
                    continue
                if mask & select.EPOLLOUT and ready.out:
                    self._flush(ready)
                # A lost connection is replaced, maybe on the same fd number.
                if self.conns.get(fd) is not ready:
                    continue
                if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._on_readable(ready)
        unsent = plan.messages - self.next_index
        in_flight = sum(len(c.items) for c in self.conns.values() if c.busy)
        self.ctl.send(
            (
                "published",
                {
                    "published": sum(self.ok_by_topic),
                    "ok_by_topic": self.ok_by_topic,
                    "errors": self.errors + unsent + in_flight,
                    "conn_errors": self.conn_errors,
                    "requests": self.requests,
                    "statuses": self.statuses,
                    "first_ns": self.first_ns,
                    "last_ns": self.last_ns,
                    "timed_out": unsent + in_flight > 0,
                    "per_request": per_request,
                },
            )
        )
        for conn in self.conns.values():
            conn.sock.close()


def _pub_main(plan: Plan, ctl: Connection) -> None:
    with contextlib.suppress(EOFError, BrokenPipeError, KeyboardInterrupt):
        _Publisher(plan, ctl).run()


class LoadRun:
    """One run of the generator, driven from the parent process.

    Call `start`, `wait_connected`, then `publish` and `finish`, then
    `results`; `close` (also on errors) ends every worker process.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.ctx = mp.get_context("fork")
        self.procs: list[Any] = []
        self.sub_ctls: list[Connection] = []
        self.pub_ctl: Connection | None = None
        self.connect_summary: dict[str, Any] = {}
        self.published: dict[str, Any] = {}
        self.timed_out = False

    def pids(self) -> list[int]:
        """The worker processes (their CPU is the generator's CPU)."""
        return [p.pid for p in self.procs if p.pid is not None]

    def start(self) -> None:
        plan = self.plan
        workers = max(1, min(plan.workers, plan.subs)) if plan.subs else 0
        order = list(range(plan.subs))
        # Interleaved slices keep every worker's topic mix alike.
        for w in range(workers):
            parent, child = self.ctx.Pipe()
            p = self.ctx.Process(
                target=_sub_worker_main,
                args=(plan, order[w::workers], child, w),
                daemon=True,
            )
            p.start()
            child.close()
            self.procs.append(p)
            self.sub_ctls.append(parent)
        if plan.messages:
            parent, child = self.ctx.Pipe()
            p = self.ctx.Process(target=_pub_main, args=(plan, child), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.pub_ctl = parent

    def _recv(self, ctl: Connection, kind: str, timeout: float) -> dict[str, Any]:
        if not ctl.poll(timeout):
            raise TimeoutError(
                f"no {kind!r} from a load generator worker in {timeout:g} s"
            )
        msg = ctl.recv()
        if msg[0] != kind:
            raise RuntimeError(f"expected {kind!r} from a worker, got {msg[0]!r}")
        return msg[1]  # type: ignore[no-any-return]

    def wait_connected(self) -> dict[str, Any]:
        """Block until every subscriber connected or failed."""
        plan = self.plan
        connected = 0
        fail: dict[str, int] = {}
        started = time.monotonic()
        for ctl in self.sub_ctls:
            r = self._recv(ctl, "connected", plan.connect_timeout + 30)
            connected += r["connected"]
            for k, v in r["fail"].items():
                fail[k] = fail.get(k, 0) + v
        if self.pub_ctl is not None:
            self._recv(self.pub_ctl, "ready", 30)
        self.connect_summary = {
            "subs_connected": connected,
            "sub_fail": fail,
            "connect_wait_s": round(time.monotonic() - started, 3),
        }
        return self.connect_summary

    def publish(self) -> dict[str, Any]:
        """Publish everything; returns the publisher's figures."""
        if self.pub_ctl is None:
            self.published = {
                "published": 0,
                "ok_by_topic": [0] * self.plan.topics,
                "errors": 0,
                "first_ns": 0,
                "last_ns": 0,
            }
            return self.published
        self.pub_ctl.send(("go",))
        self.published = self._recv(self.pub_ctl, "published", self.plan.timeout + 30)
        return self.published

    def finish(self) -> None:
        """Wait until every subscriber got every event published to its topic
        (or ``drain`` seconds passed)."""
        expected = self.published.get("ok_by_topic") or [0] * self.plan.topics
        for ctl in self.sub_ctls:
            ctl.send(("finish", expected, self.plan.drain))
        for ctl in self.sub_ctls:
            r = self._recv(ctl, "done", self.plan.drain + 30)
            self.timed_out = self.timed_out or r["timed_out"]

    def results(self) -> dict[str, Any]:
        """Collect and combine the workers' figures (latencies in µs)."""
        plan = self.plan
        summed = [
            "closed_early", "delivered", "duplicates", "out_of_order", "invalid",
            "proto_errors", "bytes_rx", "still_open",
        ]  # fmt: skip
        total: dict[str, Any] = dict.fromkeys(summed, 0)
        total.update(first_ns=0, last_ns=0)
        orders: dict[int, dict[int, int]] = {}
        subs_by_topic = [0] * plan.topics
        lat = array.array("q")
        for ctl in self.sub_ctls:
            ctl.send(("stop",))
        for ctl in self.sub_ctls:
            r = self._recv(ctl, "results", 60)
            for k in summed:
                total[k] += r[k]
            if r["first_ns"]:
                total["first_ns"] = min(
                    total["first_ns"] or r["first_ns"], r["first_ns"]
                )
            total["last_ns"] = max(total["last_ns"], r["last_ns"])
            for t, by_hash in r["orders"].items():
                mine = orders.setdefault(t, {})
                for h, n in by_hash.items():
                    mine[h] = mine.get(h, 0) + n
            for t, n in enumerate(r["subs_by_topic"]):
                subs_by_topic[t] += n
            part = array.array("q")
            part.frombytes(r["lat"])
            lat.extend(part)
        pub = self.published
        ok_by_topic = pub.get("ok_by_topic") or [0] * plan.topics
        expected = sum(ok * n for ok, n in zip(ok_by_topic, subs_by_topic, strict=True))
        # Subscribers of one topic that got everything but in another order
        # than the majority of that topic's complete subscribers.
        order_mismatch = sum(
            sum(by_hash.values()) - max(by_hash.values()) for by_hash in orders.values()
        )
        latencies = sorted(v // 1000 for v in lat)
        first_pub = pub.get("first_ns") or 0
        delivery_s = (
            (total["last_ns"] - first_pub) / 1e9
            if first_pub and total["last_ns"]
            else 0
        )
        publish_s = (
            (pub["last_ns"] - pub["first_ns"]) / 1e9 if pub.get("last_ns") else 0
        )
        result = dict(self.connect_summary)
        result.update(
            {
                "published": pub.get("published", 0),
                "publish_errors": pub.get("errors", 0),
                "pub_conn_errors": pub.get("conn_errors", 0),
                "publish_s": round(publish_s, 4),
                "publish_rate": round(pub.get("published", 0) / publish_s, 1)
                if publish_s
                else 0,
                "requests": pub.get("requests", 0),
                "statuses": pub.get("statuses", {}),
                "expected_deliveries": expected,
                "delivered": total["delivered"],
                "lost": max(0, expected - total["delivered"]),
                "duplicates": total["duplicates"],
                "out_of_order": total["out_of_order"],
                "order_mismatch": order_mismatch,
                "invalid": total["invalid"],
                "proto_errors": total["proto_errors"],
                "closed_early": total["closed_early"],
                "bytes_rx": total["bytes_rx"],
                "delivery_s": round(delivery_s, 4),
                "delivery_rate": round(total["delivered"] / delivery_s, 1)
                if delivery_s
                else 0,
                "timed_out": self.timed_out or bool(pub.get("timed_out")),
            }
        )
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
            result[f"lat_us_{name}"] = _pick(latencies, q)
        result["lat_us_max"] = latencies[-1] if latencies else None
        result["plan"] = asdict(plan)
        return result

    def close(self) -> None:
        for ctl in self.sub_ctls + ([self.pub_ctl] if self.pub_ctl else []):
            with contextlib.suppress(OSError):
                ctl.close()
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        self.procs = []


def _pick(sorted_values: list[int], q: float) -> int | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def random_prefix() -> str:
    """A topic prefix unlikely to meet another run's topics."""
    return f"b{random.getrandbits(16):04x}-"


def process_count_hint() -> int:
    """Default number of subscriber workers: half the cores, at least one
    (the server needs the rest)."""
    return max(1, (os.cpu_count() or 2) // 2)


def _selftest_streams() -> list[tuple[str, bytes, bool, bool]]:
    """Crafted streams: (name, body as sent, is_chunked, is_gzip)."""
    events = [": listening\n\nretry: 5000\n\n"]
    for s in range(5):
        data = f'{{"t":0,"s":{s},"c":0,"ts":1,"pad":"xx"}}'
        events.append(f"id: a-{s}\nevent: message\ndata: {data}\n\n")
        if s == 2:
            events.append(": keep-alive\n\n")
            events.append(
                'event: message\ndata: {"t":1,"s":9,"c":0,"ts":1,"pad":""}\n\n'
            )
    events.append('data: {"t":0,"s":7,"c":0,"ts":1,"pad":"unterminated"}\n')
    text = "".join(events)
    out = []
    for ending in ("\n", "\r\n", "\r"):
        raw = text.replace("\n", ending).encode()
        for is_gzip in (False, True):
            body = raw
            if is_gzip:
                z = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
                body = z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)
            for is_chunked in (False, True):
                sent = body
                if is_chunked:
                    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
                    sent = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
                name = f"{ending!r} gzip={is_gzip} chunked={is_chunked}"
                out.append((name, sent, is_chunked, is_gzip))
    return out


def selftest() -> int:
    """Feed crafted streams through the subscriber parser, split at every
    byte position (and at every pair of positions on a stride); each must
    yield exactly the five complete events of the subscriber's topic."""
    plan = Plan(subs=1, topics=2, messages=20, pub_conns=1)
    failures = 0
    cases = 0
    for name, body, is_chunked, is_gzip in _selftest_streams():
        splits: list[tuple[int, ...]] = [(i,) for i in range(len(body) + 1)]
        splits += [
            (i, j) for i in range(0, len(body), 5) for j in range(i, len(body), 11)
        ]
        for cut in splits:
            worker = _SubWorker(plan, [], None, 0)  # type: ignore[arg-type]
            sock = socket.socket()
            try:
                sub = _Sub(sock, 0, plan, worker.patterns[0])
                sub.state = 2
                sub.is_chunked = is_chunked
                if is_gzip:
                    sub.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                bounds = [0, *cut, len(body)]
                for a, b in zip(bounds, bounds[1:], strict=False):
                    if b > a:
                        worker._on_body(sub, body[a:b], 2)
            finally:
                sock.close()
                worker.ep.close()
            cases += 1
            got = (sub.count, worker.duplicates, worker.invalid, sorted(worker.lat))
            if got != (5, 0, 0, [1] * 5):
                failures += 1
                if failures <= 5:
                    print(f"FAIL {name} split {cut}: {got}")
    print(f"selftest: {cases} cases, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--selftest"]:
        sys.stderr.write("usage: loadgen.py --selftest (run.py drives the generator)\n")
        sys.exit(2)
    sys.exit(selftest())
