"""Topics, replay windows and subscribers of one instance, and the fan-out.

Events enter through `Dispatcher.ingest` in the order the broker heard them.
Each one is encoded once into an SSE frame, stored in its topic's ring and
queued for fan-out on the topic's shard. A shard drains its queue in bounded
steps on the IOLoop; each step joins a topic's new frames into one bytes object
and hands that to every subscriber of the topic (see `ssepg._fast.Channel`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import ujson

from ._fast import (
    GZIP_HEADER,
    Channel,
    Message,
    Subscriber,
    check_json,
    comment,
    fnv1a_32,
    is_event_name,
    solo_compress,
)
from .log import RateLimitedLog, access_log, hub_log
from .subscription import Event, Subscription
from .topics import Topic, normalize_topic, reset_frame, topic_memory

__all__ = ["Dispatcher", "new_instance_id"]

RETRY_MS = 5000
KEEP_ALIVE_FRAME = b": keep-alive\n\n"
GAP_FRAME = b"event: ssepg-gap\ndata: {}\n\n"

# A subscriber whose socket took nothing for this long is dropped. The same
# bound is set as TCP_USER_TIMEOUT, so the kernel also gives up on a peer that
# stopped acknowledging (a dead network path) instead of retrying for minutes.
WRITE_TIMEOUT_S = 30.0

# Frames of one topic joined into one write; a larger backlog goes out in
# several steps so other topics get their turn.
MAX_CHUNK_FRAMES = 512

# Frames a shard fans out before it yields to the IOLoop.
DRAIN_BUDGET_FRAMES = 4096

# Events a multi-topic drain step takes from its queue.
MULTI_BATCH = 1024

# Longest a fan-out waits for events already on their way (publish requests
# being parsed): events that arrive together leave in one write per
# subscriber, which is where fan-out throughput comes from.
MAX_COALESCE_S = 0.002

# A shard's fan-out that took longer than this, under a burst (a topic had
# several events waiting), makes its next one wait as long again. The loop
# then spends about half its time reading publishes and half writing them,
# and the events read meanwhile leave together, one write per subscriber for
# many events. Quicker fan-outs, and events spaced apart, are never delayed.
PACE_MIN_S = 0.002

# How many removed topics remember the last event they held, so that a later
# resume knows whether it missed something.
DROPPED_TOPICS_REMEMBERED = 100_000

_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)

_monotonic = time.monotonic
_NOT_EXPECTED = object()

# Kernel send buffer of a subscriber socket, before the kernel doubles it.
SEND_BUFFER_BYTES = 128 * 1024


def encode_data(data: Any) -> bytes:
    """Compact JSON of *data*, a value to publish.

    :raises ValueError: *data* is None, holds NaN or infinity, or nests
        containers deeper than every instance accepts (511 levels).
    :raises TypeError: *data* holds a value JSON cannot represent.
    """
    if data is None:
        raise ValueError("data must not be None")
    try:
        # ujson is several times faster for the usual values; what it
        # refuses goes to json, which raises the precise error (or copes:
        # integers beyond 64 bits).
        raw: str = ujson.dumps(
            data, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False
        )
    except (TypeError, ValueError, OverflowError):
        try:
            raw = json.dumps(
                data, separators=(",", ":"), ensure_ascii=False, allow_nan=False
            )
        except RecursionError:
            raise ValueError("data nested too deeply") from None
    encoded = raw.encode("utf-8")
    if len(encoded) >= _DEEPEST_SHORT_JSON:
        # Receivers refuse envelopes that nest too deep; such data must not
        # get that far. The brackets stand for the envelope around it.
        # Shorter text cannot nest that deep, so most events skip the scan.
        try:
            check_json(b"[" + encoded + b"]")
        except ValueError:
            raise ValueError("data nested too deeply") from None
    return encoded


# The shortest JSON text nesting containers 511 deep: inside an envelope,
# that is the receivers' limit of 512.
_DEEPEST_SHORT_JSON = 2 * 511


def new_instance_id() -> str:
    """A short random id naming one instance: 8 lowercase base32 characters."""
    return base64.b32encode(os.urandom(5)).decode("ascii").lower()


class Dispatcher:
    """In-process topics, replay windows and subscriptions.

    Usable alone for in-process pub/sub (`publish`, `subscribe`) and, inside
    a `ssepg.Service`, fed by a broker through `ingest`. It belongs to the
    IOLoop it is first used on; `close` it on that loop.

    :param ring_capacity: events kept per topic (a power of two); also the
        replay window for ``Last-Event-ID``.
    :param fanout_shards: fan-out queues; topics are spread over them by hash
        and each drains in bounded steps, so one hot topic cannot starve
        others.
    :param client_buffer: unsent bytes a subscriber may accumulate before it
        is dropped as a slow consumer.
    :param keep_alive: seconds between heartbeat comments on SSE streams.
    """

    def __init__(
        self,
        *,
        ring_capacity: int = 1024,
        fanout_shards: int = 4,
        client_buffer: int = 1 << 20,
        keep_alive: float = 15.0,
        topic_idle_timeout: float = 300.0,
        instance_id: str | None = None,
    ) -> None:
        if ring_capacity < 1 or ring_capacity & (ring_capacity - 1):
            raise ValueError(
                f"ring_capacity must be a power of two, got {ring_capacity!r}"
            )
        if fanout_shards < 1:
            raise ValueError(f"fanout_shards must be at least 1, got {fanout_shards!r}")
        self.ring_capacity = ring_capacity
        self.fanout_shards = fanout_shards
        self.client_buffer = client_buffer
        self.keep_alive = keep_alive
        self.topic_idle_timeout = topic_idle_timeout
        self.instance_id = instance_id or new_instance_id()
        self.topics: dict[str, Topic] = {}
        self.gseq = 0
        self.gap_gseq = 0
        self._counter = itertools.count(1)
        self._index: dict[str, Message] = {}
        self._shards: list[collections.deque[Topic]] = [
            collections.deque() for _ in range(fanout_shards)
        ]
        self._shard_scheduled = [False] * fanout_shards
        # The drains due on the next loop turn, which `fan_out_now` may run
        # before it.
        self._due: list[asyncio.Handle | None] = [None] * fanout_shards
        # When each shard's next fan-out may start (PACE_MIN_S).
        self._shard_ready_at = [0.0] * fanout_shards
        self._groups: dict[tuple[str, ...], Channel] = {}
        self._multi_queue: collections.deque[Message] = collections.deque()
        self._multi_scheduled = False
        self._multi_due: asyncio.Handle | None = None
        self._channels: set[Channel] = set()
        self._streams: set[Subscriber] = set()
        self._holds = 0
        # Events of held publishes not heard back yet (with what to call
        # once one is), and how many of the holds are for events already
        # heard (they no longer hold anything).
        self._expected: dict[str, Callable[[], None] | None] = {}
        self._heard_early = 0
        self._on_heard: list[Callable[[], None]] = []
        self._waiting_since: float | None = None
        self._parked: list[tuple[Callable[..., None], tuple[object, ...]]] = []
        self._park_timer: asyncio.TimerHandle | None = None
        self._lagging: list[Subscriber] = []
        self._dead: list[Subscriber] = []
        self._slow: list[Subscriber] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heartbeat_handle: asyncio.TimerHandle | None = None
        self._dropped_topics: collections.OrderedDict[str, int] = (
            collections.OrderedDict()
        )
        self._dropped_floor = 0
        self._slow_log = RateLimitedLog(hub_log, 30)
        self.is_closed = False
        # Totals since start; per-topic figures live on each Topic.
        self.received = 0
        self.published = 0
        self.broadcast = 0
        self.dropped_clients = 0
        self.ring_overwrites = 0
        self.duplicates = 0
        self.python_delivered = 0
        self.removed_topics = 0
        self.multi_delivered_retired = 0
        self.delivered_retired = 0

    # Loop and ids ------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def next_id(self) -> str:
        """A new event id, unique across instances: ``<instance>-<counter>``."""
        return f"{self.instance_id}-{next(self._counter)}"

    # Events in ---------------------------------------------------------------

    def publish(self, topic: str, data: Any, event: str | None = None) -> str:
        """Deliver *data* (any JSON-serialisable value but None) to every
        subscriber of *topic* in this process and return the event id.

        :raises InvalidTopic: bad topic id.
        :raises ValueError: bad event name, or *data* is None.
        """
        return self.publish_raw(normalize_topic(topic), encode_data(data), event)

    def publish_raw(self, topic: str, data: bytes, event: str | None = None) -> str:
        """Like `publish` for a normalised topic and compact JSON bytes."""
        if self.is_closed:
            raise RuntimeError("dispatcher is closed")
        if event is None:
            event = "message"
        elif not is_event_name(event):
            raise ValueError(f"invalid event name {event!r}")
        event_id = self.next_id()
        self.ingest(topic, event_id, event, data)
        self.count_published(topic)
        return event_id

    def count_published(self, topic: str) -> None:
        """Count one event published through this instance on *topic*."""
        self.published += 1
        # The event may not be back from the broker yet: the topic is created
        # now (as its arrival would) so that the count is not lost.
        t = self.topics.get(topic)
        if t is None:
            t = self._create_topic(topic)
        t.published += 1

    def ingest(self, topic: str, event_id: str, event: str, data: bytes) -> Message:
        """Take one event heard from the broker, in arrival order.

        *topic*, *event_id* and *event* must be valid (the broker checks
        envelopes) and *data* compact JSON. An event whose id is still in
        a window is a copy and is dropped: a publish retried after its
        connection was lost may have been committed the first time too.
        """
        first = self._index.get(event_id)
        if first is not None:
            self.duplicates += 1
            return first
        t = self.topics.get(topic)
        if t is None:
            t = self._create_topic(topic)
        ring = t.ring
        if ring.head - t.fanned >= ring.capacity:
            # Never overwrite an event that was not fanned out yet.
            self._fan_topic(t)
            self._settle()
        self.gseq += 1
        msg = Message(topic, event_id, event, data, ring.head, self.gseq)
        old = ring.append(msg)
        if old is not None:
            if self._index.get(old.id) is old:
                del self._index[old.id]
            t.lost_upto = old.gseq
            t.ring_overwrites += 1
            self.ring_overwrites += 1
        self._index[event_id] = msg
        if self._expected and event_id in self._expected:
            self._heard(event_id)
        self.received += 1
        t.last_activity = _monotonic()
        ch = t.channel
        if not (t.python_subs or t.multi_channels or (ch is not None and len(ch))):
            # Passive topic: nothing to send, the window is all it keeps.
            # Events still queued when its last subscriber left count too.
            n = ring.head - t.fanned
            t.fanned = ring.head
            t.broadcast += n
            self.broadcast += n
        elif not t.is_queued:
            t.is_queued = True
            self._shards[t.shard].append(t)
            if not self._shard_scheduled[t.shard]:
                self._shard_scheduled[t.shard] = True
                self._schedule_drain(t.shard)
        if self._groups or self._multi_queue:
            self._multi_queue.append(msg)
            if not self._multi_scheduled:
                self._multi_scheduled = True
                self._multi_due = self.loop.call_soon(self._drain_multi)
        return msg

    def _create_topic(self, name: str) -> Topic:
        lost = max(self.gap_gseq, self._dropped_topics.pop(name, self._dropped_floor))
        t = Topic(name, self.ring_capacity, fnv1a_32(name) % self.fanout_shards, lost)
        self.topics[name] = t
        return t

    # Fan-out -----------------------------------------------------------------

    def _fan_topic(self, t: Topic) -> int:
        ring = t.ring
        start = t.fanned
        stop = min(ring.head, start + MAX_CHUNK_FRAMES)
        n = stop - start
        if n <= 0:
            return 0
        ch = t.channel
        if ch is not None and len(ch):
            ch.deliver(
                ring.join_frames(start, stop), n, self._lagging, self._dead, self._slow
            )
        if t.python_subs:
            messages = ring.messages(start, stop)
            for sub in list(t.python_subs):
                sub._feed(messages)
            t.python_delivered += n * len(t.python_subs)
            self.python_delivered += n * len(t.python_subs)
        t.fanned = stop
        t.broadcast += n
        self.broadcast += n
        return n

    def hold(self) -> None:
        """Say that an event is on its way (a publish request is being read):
        fan-outs wait for it, at most `MAX_COALESCE_S`. Pair with `release`."""
        self._holds += 1

    def release(self) -> None:
        """The event announced by `hold` was ingested, or will not come."""
        self._holds -= 1
        if self._parked and not self._is_holding():
            self._unpark()

    def expect(self, event_id: str, on_heard: Callable[[], None] | None = None) -> None:
        """Name the event a held publish sent to the broker. Once it is
        heard back, its hold no longer keeps fan-outs waiting, although the
        publish may wait a little longer for the broker's confirmation,
        and *on_heard* is called: after the fan-outs that `fan_out_now`
        runs, or else on the next loop turn. Call while holding; pair with
        `settle` before the `release`."""
        self._expected[event_id] = on_heard

    def settle(self, event_id: str) -> None:
        """The publish of *event_id* (see `expect`) is over: confirmed,
        failed, or heard back."""
        if self._expected.pop(event_id, _NOT_EXPECTED) is _NOT_EXPECTED:
            self._heard_early -= 1

    def _heard(self, event_id: str) -> None:
        on_heard = self._expected.pop(event_id)
        self._heard_early += 1
        if on_heard is not None:
            if not self._on_heard:
                self.loop.call_soon(self._call_on_heard)
            self._on_heard.append(on_heard)

    def _call_on_heard(self) -> None:
        calls, self._on_heard = self._on_heard, []
        for call in calls:
            call()

    def _is_holding(self) -> bool:
        # Some held publish's event has not been heard back yet.
        return self._holds > self._heard_early

    def _should_wait(self) -> bool:
        if not self._is_holding():
            return False
        now = self.loop.time()
        if self._waiting_since is None:
            self._waiting_since = now
        return now - self._waiting_since < MAX_COALESCE_S

    def _park(self, drain: Callable[..., None], *args: int) -> None:
        # A drain that waits for held events sleeps until the last hold is
        # released or the wait reaches MAX_COALESCE_S, whichever comes first;
        # it never spins the loop meanwhile. Every drain that parks meanwhile
        # shares that one wait, and is called back as having waited.
        self._parked.append((drain, (*args, True)))
        if self._park_timer is None:
            assert self._waiting_since is not None
            self._park_timer = self.loop.call_at(
                self._waiting_since + MAX_COALESCE_S, self._unpark
            )

    def _unpark(self, now: bool = False) -> None:
        if self._park_timer is not None:
            self._park_timer.cancel()
            self._park_timer = None
        # The wait is over for every drain parked in it: they all run now,
        # none parks again (each starting a wait of its own would hold the
        # shards back one after another), and a later drain starts anew.
        self._waiting_since = None
        parked, self._parked = self._parked, []
        for drain, args in parked:
            if now:
                drain(*args)
            else:
                self.loop.call_soon(drain, *args)

    def fan_out_now(self) -> None:
        """Run now the fan-outs due on the next loop turn, and those waiting
        for held events that have all been heard meanwhile. For the broker,
        once it has ingested what it read: nothing else can join those
        fan-outs before the next turn, so waiting for it only adds latency."""
        if self._parked and not self._is_holding():
            self._unpark(now=True)
        due = self._due
        for index in range(len(due)):
            handle = due[index]
            if handle is not None:
                handle.cancel()
                self._drain_shard(index)
        handle = self._multi_due
        if handle is not None:
            handle.cancel()
            self._drain_multi()
        if self._on_heard:
            self._call_on_heard()

    def _schedule_drain(self, index: int) -> None:
        ready_at = self._shard_ready_at[index]
        if ready_at:
            delay = ready_at - _monotonic()
            if delay > 0:
                self.loop.call_later(delay, self._drain_shard, index)
                return
        self._due[index] = self.loop.call_soon(self._drain_shard, index)

    def _drain_shard(self, index: int, waited: bool = False) -> None:
        self._due[index] = None
        if not waited and self._should_wait():
            self._park(self._drain_shard, index)
            return
        self._shard_scheduled[index] = False
        started = _monotonic()
        queue = self._shards[index]
        budget = DRAIN_BUDGET_FRAMES
        fanned = 0
        while queue and budget > 0:
            t = queue.popleft()
            budget -= self._fan_topic(t)
            fanned += 1
            if t.fanned < t.ring.head:
                queue.append(t)
            else:
                t.is_queued = False
        self._settle()
        now = _monotonic()
        took = now - started
        # Paced only while events come faster than they leave: some topic
        # had several frames waiting. Events spaced apart never wait.
        is_burst = DRAIN_BUDGET_FRAMES - budget > fanned
        self._shard_ready_at[index] = (
            now + took if took > PACE_MIN_S and is_burst else 0.0
        )
        if queue and not self._shard_scheduled[index]:
            self._shard_scheduled[index] = True
            self._schedule_drain(index)

    def _drain_multi(self, waited: bool = False) -> None:
        self._multi_due = None
        if not waited and self._should_wait():
            self._park(self._drain_multi)
            return
        self._multi_scheduled = False
        self._fan_multi()
        self._settle()
        if self._multi_queue and not self._multi_scheduled:
            self._multi_scheduled = True
            self._multi_due = self.loop.call_soon(self._drain_multi)

    def _fan_multi(self) -> None:
        # One step of the multi-topic fan-out: events in arrival order, each
        # set of topics getting one joined chunk.
        queue = self._multi_queue
        chunks: dict[Channel, list[bytes]] = {}
        for _ in range(min(MULTI_BATCH, len(queue))):
            msg = queue.popleft()
            t = self.topics.get(msg.topic)
            if t is None or not t.multi_channels:
                continue
            frame = msg.multi_frame
            for ch in t.multi_channels:
                frames = chunks.get(ch)
                if frames is None:
                    chunks[ch] = [frame]
                else:
                    frames.append(frame)
        for ch, frames in chunks.items():
            ch.deliver(
                b"".join(frames), len(frames), self._lagging, self._dead, self._slow
            )

    def _multi_bound(self) -> int:
        # Every event up to this gseq went through the multi-topic fan-out.
        return self._multi_queue[0].gseq - 1 if self._multi_queue else self.gseq

    def flush(self) -> None:
        """Fan out everything queued now, without waiting for the IOLoop."""
        for index, queue in enumerate(self._shards):
            handle = self._due[index]
            if handle is not None:
                handle.cancel()
                self._due[index] = None
            while queue:
                t = queue.popleft()
                while t.fanned < t.ring.head:
                    self._fan_topic(t)
                t.is_queued = False
            self._shard_scheduled[index] = False
        while self._multi_queue:
            self._fan_multi()
        self._settle()

    def _settle(self) -> None:
        # Deal with the subscribers the last deliveries sorted out.
        if self._lagging:
            lagging, self._lagging = self._lagging, []
            now = time.monotonic()
            for sub in lagging:
                if not sub.is_closed:
                    sub.stalled_since = now
                    self.loop.add_writer(sub.fd, self._on_writable, sub)
        if self._slow:
            slow, self._slow = self._slow, []
            for sub in slow:
                self._drop_slow(sub, "slow consumer")
        if self._dead:
            dead, self._dead = self._dead, []
            for sub in dead:
                self._remove(sub, "connection lost")

    # SSE streams -------------------------------------------------------------

    def add_stream(
        self,
        sock: socket.socket,
        topics: tuple[str, ...],
        *,
        head: bytes = b"",
        is_gzip: bool = False,
        last_event_id: str | None = None,
        retry_ms: int = RETRY_MS,
    ) -> Subscriber | None:
        """Serve an SSE stream of *topics* (normalised ids) on *sock*, a
        connected non-blocking socket the dispatcher now owns and closes.

        *head* (the HTTP response head) goes out first, then the preamble, a
        replay of what the windows hold after *last_event_id* (or
        ``ssepg-reset`` for each topic that cannot be resumed), then live
        events. Returns None when the client is already gone.
        """
        if self.is_closed:
            raise RuntimeError("dispatcher is closed")
        if not topics:
            raise ValueError("a stream needs at least one topic")
        is_multi = len(topics) > 1
        ts = [self.topics.get(name) or self._create_topic(name) for name in topics]
        parts = [b"retry: %d\n\n" % retry_ms, comment("listening " + ",".join(topics))]
        if last_event_id:
            parts.extend(self._resume_frames(ts, last_event_id, is_multi))
        plain = b"".join(parts)
        label = ",".join(topics)
        sub = Subscriber(sock, is_gzip, label, time.monotonic())
        _tune_socket(sock)
        if is_gzip:
            sub.account(plain)
            rc = sub.write_raw(head + GZIP_HEADER + solo_compress(plain))
        else:
            rc = sub.write_raw(head + plain)
        if rc < 0:
            sock.close()
            return None
        # Replay and preamble may exceed client_buffer; the slow-consumer
        # bound applies to what comes after them.
        sub.grace = sub.queued_bytes
        if is_multi:
            key = tuple(sorted(set(topics)))
            ch = self._groups.get(key)
            if ch is None:
                ch = self._groups[key] = Channel(key, self.client_buffer)
                for t in ts:
                    t.multi_channels.append(ch)
        else:
            t = ts[0]
            ch = t.channel
            if ch is None:
                ch = t.channel = Channel(t.name, self.client_buffer)
            if t.fanned < t.ring.head and not t.is_queued:
                t.is_queued = True
                self._shards[t.shard].append(t)
        ch.add(sub)
        self._channels.add(ch)
        self._streams.add(sub)
        loop = self.loop
        loop.add_reader(sub.fd, self._on_readable, sub)
        if rc == 1:
            sub.stalled_since = time.monotonic()
            loop.add_writer(sub.fd, self._on_writable, sub)
        if self._heartbeat_handle is None:
            self._heartbeat_handle = loop.call_later(self.keep_alive, self._heartbeat)
        hub_log.debug(
            "subscribed %s (fd %d%s)", label, sub.fd, ", gzip" if is_gzip else ""
        )
        return sub

    def _resume_frames(
        self, ts: list[Topic], last_event_id: str, is_multi: bool
    ) -> list[bytes]:
        anchor = self._index.get(last_event_id)
        if anchor is not None and (
            self._multi_queue or any(t.fanned < t.ring.head for t in ts)
        ):
            # The client may come from an instance that ran ahead of this one:
            # events up to its id can still wait for fan-out here and would
            # reach it a second time. Fan them out now; the replay does the rest.
            self.flush()
        resets: list[bytes] = []
        replay: list[Message] = []
        bound = self._multi_bound() if is_multi else 0
        for t in ts:
            if (
                anchor is None
                or anchor.gseq <= self.gap_gseq
                or anchor.gseq < t.lost_upto
            ):
                resets.append(reset_frame(t.name))
                continue
            ring = t.ring
            start = ring.first_after_gseq(anchor.gseq)
            for m in ring.messages(start, ring.head if is_multi else t.fanned):
                if is_multi and m.gseq > bound:
                    break
                replay.append(m)
        if is_multi:
            replay.sort(key=_gseq_of)
            return resets + [m.multi_frame for m in replay]
        return resets + [m.frame for m in replay]

    def streams(self) -> list[Subscriber]:
        """The open SSE streams."""
        return list(self._streams)

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def _on_readable(self, sub: Subscriber) -> None:
        try:
            data = sub.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno == errno.ETIMEDOUT:
                # TCP_USER_TIMEOUT fired: the client took nothing for
                # WRITE_TIMEOUT_S (the kernel tends to notice before the
                # heartbeat does), so it counts as a write timeout.
                self._drop_slow(sub, "write timeout")
            else:
                self._remove(sub, "connection reset")
            return
        if not data:
            self._remove(sub, "closed by client")
        # Anything else a client sends on an event stream is ignored.

    def _on_writable(self, sub: Subscriber) -> None:
        status, frames = sub.flush()
        if frames and sub.channel is not None:
            # Frames that waited for the socket count once they left in full.
            sub.channel.delivered_frames += frames
        if status == 0:
            self.loop.remove_writer(sub.fd)
            sub.stalled_since = 0.0
        elif status < 0:
            self._remove(sub, "connection lost")
        else:
            sub.stalled_since = time.monotonic()

    def _drop_slow(self, sub: Subscriber, reason: str) -> None:
        if sub.is_closed:
            return
        # All of it stays unsent: the stream closes next.
        unsent = sub.queued_bytes
        sub.drop_queue()
        self.dropped_clients += 1
        ch = sub.channel
        if ch is not None:
            ch.dropped_clients += 1
            for name in _channel_topics(ch):
                t = self.topics.get(name)
                if t is not None:
                    t.dropped_clients += 1
        self._slow_log.log(
            "dropped subscriber of %s: %s, %d bytes unsent (limit %d)",
            sub.label,
            reason,
            unsent,
            self.client_buffer,
        )
        self.close_stream(sub, comment(reason))

    def close_stream(
        self, sub: Subscriber, goodbye: bytes = b"", reason: str = "closed"
    ) -> None:
        """Send *goodbye* (plain SSE bytes) if the socket takes it at once,
        end a gzip stream properly, and close."""
        if sub.is_closed:
            return
        if sub.is_gzip:
            packed = b""
            if goodbye:
                sub.account(goodbye)
                packed = solo_compress(goodbye)
            sub.send_now(packed + sub.gzip_end())
        elif goodbye:
            sub.send_now(goodbye)
        self._remove(sub, reason)

    def _remove(self, sub: Subscriber, reason: str) -> None:
        if sub.is_closed:
            return
        sub.is_closed = True
        loop = self.loop
        loop.remove_reader(sub.fd)
        loop.remove_writer(sub.fd)
        ch = sub.channel
        if ch is not None:
            ch.remove(sub)
            if not len(ch):
                self._retire_channel(ch)
        self._streams.discard(sub)
        with contextlib.suppress(OSError):
            sub.sock.close()
        access_log.info(
            "GET %s stream 200 %.3fs %s",
            sub.label,
            time.monotonic() - sub.started,
            reason,
        )

    def _retire_channel(self, ch: Channel) -> None:
        self._channels.discard(ch)
        key = ch.key
        if isinstance(key, tuple):
            self._groups.pop(key, None)
            for name in key:
                t = self.topics.get(name)
                if t is not None and ch in t.multi_channels:
                    t.multi_channels.remove(ch)
            self.multi_delivered_retired += ch.delivered_frames
        ch.release()
        # A single-topic channel stays on its topic (its counters feed health)
        # until the topic itself is removed.

    def _heartbeat(self) -> None:
        self._heartbeat_handle = None
        if self.is_closed:
            return
        now = time.monotonic()
        stalled: list[Subscriber] = []
        for ch in list(self._channels):
            if len(ch):
                ch.heartbeat(
                    KEEP_ALIVE_FRAME,
                    now,
                    WRITE_TIMEOUT_S,
                    self._lagging,
                    self._dead,
                    self._slow,
                    stalled,
                )
        self._settle()
        for sub in stalled:
            self._drop_slow(sub, "write timeout")
        if self._streams:
            self._heartbeat_handle = self.loop.call_later(
                self.keep_alive, self._heartbeat
            )

    def mark_gap(self) -> None:
        """Tell every subscriber that events may have been missed (the broker
        lost its connection). A later resume from before this point answers
        ``ssepg-reset``."""
        self.flush()
        self.gap_gseq = self.gseq
        for ch in list(self._channels):
            if len(ch):
                ch.deliver(GAP_FRAME, 0, self._lagging, self._dead, self._slow)
        for t in self.topics.values():
            for sub in list(t.python_subs):
                sub._feed([Event(t.name, None, "ssepg-gap", "{}")])
        self._settle()

    # In-process subscriptions ------------------------------------------------

    def subscribe(self, topic: str, last_event_id: str | None = None) -> Subscription:
        """Receive the events of *topic* published from now on (or after
        *last_event_id*, as far as the window holds; otherwise an
        ``ssepg-reset`` event comes first). An empty id is no id.

        :raises InvalidTopic: bad topic id.
        """
        if self.is_closed:
            raise RuntimeError("dispatcher is closed")
        name = normalize_topic(topic)
        t = self.topics.get(name) or self._create_topic(name)
        sub = Subscription(self, t)
        if last_event_id:
            anchor = self._index.get(last_event_id)
            if anchor is not None and t.fanned < t.ring.head:
                self.flush()  # as in _resume_frames: no event twice
            if (
                anchor is None
                or anchor.gseq <= self.gap_gseq
                or anchor.gseq < t.lost_upto
            ):
                sub._feed([Event(name, None, "ssepg-reset", f'{{"topic":"{name}"}}')])
            else:
                sub._feed(
                    t.ring.messages(t.ring.first_after_gseq(anchor.gseq), t.fanned)
                )
        t.python_subs.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub.is_closed:
            return
        sub.is_closed = True
        t = sub._topic
        if sub in t.python_subs:
            t.python_subs.remove(sub)
        sub._wake()

    # Maintenance -------------------------------------------------------------

    def remove_idle_topics(self, idle_timeout: float | None = None) -> tuple[int, int]:
        """Remove topics without subscribers and without traffic for
        *idle_timeout* seconds; returns how many and the bytes they held."""
        timeout = self.topic_idle_timeout if idle_timeout is None else idle_timeout
        cutoff = time.monotonic() - timeout
        removed = freed = 0
        for t in list(self.topics.values()):
            if t.last_activity <= cutoff and not t.has_subscribers and not t.is_queued:
                freed += topic_memory(t)
                self._drop_topic(t)
                removed += 1
        self.removed_topics += removed
        if removed:
            _release_free_memory()
        return removed, freed

    def _drop_topic(self, t: Topic) -> None:
        # Totals stay totals since start when the topic goes.
        ch = t.channel
        self.delivered_retired += t.python_delivered + (
            ch.delivered_frames if ch is not None else 0
        )
        for m in t.ring.clear():
            if self._index.get(m.id) is m:
                del self._index[m.id]
        del self.topics[t.name]
        self._dropped_topics[t.name] = self.gseq
        while len(self._dropped_topics) > DROPPED_TOPICS_REMEMBERED:
            _, gseq = self._dropped_topics.popitem(last=False)
            self._dropped_floor = max(self._dropped_floor, gseq)

    def shrink_windows(self, with_subscribers: bool = False) -> tuple[int, int]:
        """Halve the replay window of every topic without subscribers (or,
        with *with_subscribers*, of those with subscribers, down to 16
        events). Returns the topics shrunk and the bytes freed."""
        shrunk = freed = 0
        for t in self.topics.values():
            if t.has_subscribers != with_subscribers:
                continue
            ring = t.ring
            floor = 16 if with_subscribers else 1
            if ring.capacity <= floor and len(ring) <= floor:
                continue
            before = topic_memory(t)
            capacity = max(floor, ring.capacity // 2)
            dropped = ring.set_capacity(capacity)
            for m in dropped:
                if self._index.get(m.id) is m:
                    del self._index[m.id]
                t.lost_upto = max(t.lost_upto, m.gseq)
            freed += before - topic_memory(t)
            shrunk += 1
        if freed:
            _release_free_memory()
        return shrunk, freed

    def restore_windows(self) -> int:
        """Give every shrunk window its full capacity back; returns how many."""
        restored = 0
        for t in self.topics.values():
            if t.ring.capacity != self.ring_capacity:
                t.ring.set_capacity(self.ring_capacity)
                restored += 1
        return restored

    # Figures -----------------------------------------------------------------

    def topic_stats(self, t: Topic, now: float, stamp: float) -> dict[str, Any]:
        ch = t.channel
        pending = ch.pending_bytes() if ch is not None else 0
        delivered = (ch.delivered_frames if ch is not None else 0) + t.python_delivered
        subscribers = t.subscriber_count
        return {
            "topic": t.name,
            "subscribers": subscribers,
            "dispatch_depth": t.ring.head - t.fanned,
            "pending_to_clients": pending,
            "published": t.published,
            "broadcast": t.broadcast,
            "delivered_frames": delivered,
            "dropped_clients": t.dropped_clients,
            "ring_overwrites": t.ring_overwrites,
            "window_events": len(t.ring),
            "window_capacity": t.ring.capacity,
            "memory_usage_bytes": topic_memory(t),
            "last_activity_unix": round(stamp - (now - t.last_activity), 3),
            "is_idle": subscribers == 0
            and now - t.last_activity >= self.topic_idle_timeout,
        }

    def stats(self, limit: int | None = None) -> dict[str, Any]:
        """Totals and per-topic figures (the *limit* busiest topics: most
        frames delivered, then most events broadcast, then most subscribers)."""
        now = time.monotonic()
        stamp = time.time()
        topics = [self.topic_stats(t, now, stamp) for t in self.topics.values()]
        multi_pending = sum(ch.pending_bytes() for ch in self._groups.values())
        multi_delivered = self.multi_delivered_retired + sum(
            ch.delivered_frames for ch in self._groups.values()
        )
        totals = {
            "topics": len(topics),
            "subscribers": len(self._streams)
            + sum(len(t.python_subs) for t in self.topics.values()),
            "streams": len(self._streams),
            "dispatch_depth": sum(x["dispatch_depth"] for x in topics)
            + len(self._multi_queue),
            "pending_to_clients": sum(x["pending_to_clients"] for x in topics)
            + multi_pending,
            "published": self.published,
            "received": self.received,
            "broadcast": self.broadcast,
            "delivered_frames": sum(x["delivered_frames"] for x in topics)
            + multi_delivered
            + self.delivered_retired,
            "dropped_clients": self.dropped_clients,
            "ring_overwrites": self.ring_overwrites,
            "duplicates": self.duplicates,
            "total_memory_usage_bytes": sum(x["memory_usage_bytes"] for x in topics),
            "idle_topics": sum(1 for x in topics if x["is_idle"]),
            "removed_topics": self.removed_topics,
        }
        topics.sort(
            key=lambda x: (x["delivered_frames"], x["broadcast"], x["subscribers"]),
            reverse=True,
        )
        if limit is not None:
            topics = topics[:limit]
        return {"totals": totals, "topics": topics}

    # Shutdown ----------------------------------------------------------------

    def close(self) -> None:
        """Close every stream and subscription at once. Idempotent."""
        if self.is_closed:
            return
        for sub in list(self._streams):
            self.close_stream(sub, comment("server shutting down"), "shutdown")
        for t in self.topics.values():
            for py_sub in list(t.python_subs):
                self._unsubscribe(py_sub)
        self.is_closed = True
        if self._heartbeat_handle is not None:
            self._heartbeat_handle.cancel()
            self._heartbeat_handle = None
        if self._park_timer is not None:
            self._park_timer.cancel()
            self._park_timer = None
        self._slow_log.report()


def _gseq_of(m: Message) -> int:
    return m.gseq


def _channel_topics(ch: Channel) -> tuple[str, ...]:
    key = ch.key
    return key if isinstance(key, tuple) else (key,)


def _tune_socket(sock: socket.socket) -> None:
    try:
        # A fixed send buffer (the kernel doubles it) bounds what a frozen
        # reader pins in kernel memory; autotuning would let it grow to
        # several MiB per connection. One fan-out write is far smaller.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _TCP_USER_TIMEOUT is not None:
            sock.setsockopt(
                socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, int(WRITE_TIMEOUT_S * 1000)
            )
    except OSError:
        pass  # not TCP (a Unix socket in tests): nothing to tune


_libc_trim: Any = None


def _release_free_memory() -> None:
    # Return freed heap pages to the OS so RSS follows what ssepg releases
    # (glibc keeps them otherwise). A no-op elsewhere.
    global _libc_trim
    if _libc_trim is None:
        name = ctypes.util.find_library("c")
        try:
            _libc_trim = (
                getattr(ctypes.CDLL(name), "malloc_trim", False) if name else False
            )
        except OSError:
            _libc_trim = False
    if _libc_trim:
        _libc_trim(0)
