"""In-process subscriptions: events of a topic as an async iterator."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from ._fast import Message
from .errors import SlowConsumer

if TYPE_CHECKING:
    from .hub import Dispatcher
    from .topics import Topic

__all__ = ["Event", "Subscription"]


class Event:
    """One event as a `Subscription` yields it.

    ``id`` is the cluster-unique event id (None on ``ssepg-gap``), ``event``
    the SSE event name, ``raw`` the compact JSON text and ``data`` its decoded
    value.
    """

    __slots__ = ("topic", "id", "event", "raw", "_data")

    def __init__(self, topic: str, event_id: str | None, event: str, raw: str) -> None:
        self.topic = topic
        self.id = event_id
        self.event = event
        self.raw = raw
        self._data: Any = Event

    @property
    def data(self) -> Any:
        if self._data is Event:
            self._data = json.loads(self.raw)
        return self._data

    def __repr__(self) -> str:
        return (
            f"Event(topic={self.topic!r}, id={self.id!r}, event={self.event!r}, "
            f"raw={self.raw!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return (self.topic, self.id, self.event, self.raw) == (
            other.topic,
            other.id,
            other.event,
            other.raw,
        )

    __hash__ = None  # type: ignore[assignment]


def _event_of(message: Message) -> Event:
    return Event(message.topic, message.id, message.event, message.data.decode("utf-8"))


class Subscription:
    """Events of one topic as an async iterator, for in-process consumers.

    Ends cleanly (``StopAsyncIteration``) after `close` or when the dispatcher
    closes; raises `SlowConsumer` if more than the dispatcher's
    ``client_buffer`` bytes of events wait unread. Belongs to the IOLoop of
    the dispatcher; close it, or use it as an async context manager.
    """

    def __init__(self, dispatcher: Dispatcher, topic: Topic) -> None:
        self._dispatcher = dispatcher
        self._topic = topic
        self._queue: collections.deque[Event | Message] = collections.deque()
        self._queued_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.is_closed = False

    @property
    def topic(self) -> str:
        return self._topic.name

    def _feed(self, messages: Iterable[Message | Event]) -> None:
        if self.is_closed:
            return
        for m in messages:
            self._queue.append(m)
            self._queued_bytes += m.size if isinstance(m, Message) else 64
        if self._queued_bytes > self._dispatcher.client_buffer:
            self._error = SlowConsumer(
                f"subscription to {self.topic!r} fell {self._queued_bytes} bytes behind"
            )
            self._dispatcher._unsubscribe(self)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while not self._queue:
            if self.is_closed:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._queue.popleft()
        if isinstance(item, Message):
            self._queued_bytes -= item.size
            return _event_of(item)
        self._queued_bytes -= 64
        return item

    def close(self) -> None:
        """Stop receiving; iteration ends once the events published before
        are read (in-process ones included, though their fan-out was still
        due)."""
        if not self.is_closed:
            t = self._topic
            if t.fanned < t.ring.head:
                self._dispatcher.flush()
        self._dispatcher._unsubscribe(self)

    unsubscribe = close

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
