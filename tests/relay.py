"""A TCP relay on loopback for breaking a network path on purpose.

Tests point a DSN (or a client) at the relay instead of the real server and
then pause it (the path goes silent without closing), stop it accepting
(connections hang in the listen backlog, as behind a dead load balancer),
make it refuse connections (reset at once, as when the server is down) or
drop chosen Postgres protocol messages on their way from the server (a
pooler in transaction mode that never delivers notifications).

The relay runs on the test's IOLoop. It speaks plain TCP; its `dsn` turns
TLS and GSS encryption off so that the Postgres messages can be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Literal

from psycopg.conninfo import conninfo_to_dict, make_conninfo

Mode = Literal["forward", "hold", "refuse"]

_CHUNK = 65536


class Link:
    """One relayed connection: the client's socket and the upstream one."""

    def __init__(
        self, relay: Relay, client: socket.socket, upstream: socket.socket
    ) -> None:
        self.relay = relay
        self.client = client
        self.upstream = upstream
        self.is_paused = False
        self.is_closed = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._pending = b""

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._pump(self.client, self.upstream, False)),
            asyncio.ensure_future(self._pump(self.upstream, self.client, True)),
        ]

    def pause(self) -> None:
        self.is_paused = True
        self._resumed.clear()

    def resume(self) -> None:
        self.is_paused = False
        self._resumed.set()

    async def _pump(
        self, src: socket.socket, dst: socket.socket, from_server: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                # A paused link reads nothing, so the sender's buffers fill up
                # just as they would behind a dead path.
                await self._resumed.wait()
                data = await loop.sock_recv(src, _CHUNK)
                if not data:
                    break
                await self._resumed.wait()
                if from_server:
                    # Always parsed, so that dropping can start or stop at
                    # any moment without losing track of message bounds.
                    data = self._filter(data)
                if data:
                    await loop.sock_sendall(dst, data)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.close()

    def _filter(self, data: bytes) -> bytes:
        # Server messages after start-up are a type byte and a big-endian
        # length that counts itself; anything incomplete waits for more.
        buf = self._pending + data
        out = bytearray()
        pos = 0
        while len(buf) - pos >= 5:
            kind = buf[pos : pos + 1]
            (length,) = struct.unpack_from("!i", buf, pos + 1)
            end = pos + 1 + length
            if end > len(buf):
                break
            if kind in self.relay.drop_types:
                self.relay.dropped[kind] = self.relay.dropped.get(kind, 0) + 1
            else:
                out += buf[pos:end]
            pos = end
        self._pending = buf[pos:]
        return bytes(out)

    def close(self, reset: bool = False) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        for sock in (self.client, self.upstream):
            if reset:
                _set_linger_zero(sock)
            with contextlib.suppress(OSError):
                sock.close()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self.relay.links.discard(self)


class Relay:
    """Relays connections from a port of 127.0.0.1 to *upstream*.

    ``mode`` decides what happens to new connections: ``forward`` relays
    them, ``hold`` leaves them unaccepted in the listen backlog (they hang
    until the mode changes back, then go through), ``refuse`` resets them at
    once. `pause` freezes the open links without closing them; new links
    are not paused. ``drop_types`` lists Postgres message types (``b"A"``
    is NotificationResponse) removed from what the server sends.
    """

    def __init__(
        self, upstream: tuple[str, int] = ("127.0.0.1", 5432), mode: Mode = "forward"
    ) -> None:
        self.upstream = upstream
        self.mode: Mode = mode
        self.drop_types: set[bytes] = set()
        self.dropped: dict[bytes, int] = {}
        self.links: set[Link] = set()
        self.accepted = 0
        self.refused = 0
        self.port = 0
        self._listener: socket.socket | None = None
        self._accepting = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._link_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Relay:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        sock.setblocking(False)
        self._listener = sock
        self.port = sock.getsockname()[1]
        self.set_mode(self.mode)
        self._task = asyncio.ensure_future(self._accept_loop())
        return self

    def dsn(self, base: str) -> str:
        """*base* with host and port replaced by the relay's, and TLS and GSS
        encryption off (the relay reads the protocol in clear)."""
        params = conninfo_to_dict(base)
        params.update(
            host="127.0.0.1",
            port=str(self.port),
            sslmode="disable",
            gssencmode="disable",
        )
        params.pop("hostaddr", None)
        return make_conninfo(**params)

    def set_mode(self, mode: Mode) -> None:
        self.mode = mode
        if mode == "hold":
            self._accepting.clear()
        else:
            self._accepting.set()

    def pause(self) -> None:
        """Freeze every open link: nothing more is read or forwarded, and no
        side learns anything (no FIN, no RST)."""
        for link in self.links:
            link.pause()

    def resume(self) -> None:
        for link in self.links:
            link.resume()

    def stop_forwarding(self) -> None:
        """The path dies silently: open links freeze and new connections
        hang unaccepted."""
        self.pause()
        self.set_mode("hold")

    def start_forwarding(self) -> None:
        """Open links carry on and held connections go through."""
        self.set_mode("forward")
        self.resume()

    def cut(self) -> None:
        """Reset every open link (both sides see a connection reset)."""
        for link in list(self.links):
            link.close(reset=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            await self._accepting.wait()
            client, _ = await loop.sock_accept(self._listener)
            if self.mode == "hold":
                # Switched to hold while waiting: keep this one for later.
                task = asyncio.ensure_future(self._held(client))
            elif self.mode == "refuse":
                self.refused += 1
                _set_linger_zero(client)
                client.close()
                continue
            else:
                task = asyncio.ensure_future(self._open(client))
            self._link_tasks.add(task)
            task.add_done_callback(self._link_tasks.discard)

    async def _held(self, client: socket.socket) -> None:
        await self._accepting.wait()
        if self.mode == "refuse":
            _set_linger_zero(client)
            client.close()
            return
        await self._open(client)

    async def _open(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        client.setblocking(False)
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        try:
            await loop.sock_connect(upstream, self.upstream)
        except OSError:
            _set_linger_zero(client)
            client.close()
            upstream.close()
            return
        self.accepted += 1
        link = Link(self, client, upstream)
        self.links.add(link)
        link.start()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for task in list(self._link_tasks):
            task.cancel()
        for link in list(self.links):
            link.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        # Let the cancelled pumps finish before the loop goes away.
        await asyncio.sleep(0)


def _set_linger_zero(sock: socket.socket) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
