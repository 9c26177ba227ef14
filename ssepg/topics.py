"""Topic ids and what one instance keeps per topic."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ._fast import Channel, Ring, encode_frame, is_topic
from .errors import InvalidTopic

if TYPE_CHECKING:
    from .subscription import Subscription

__all__ = ["Topic", "normalize_topic", "reset_frame", "topic_memory"]


def normalize_topic(name: str) -> str:
    """ASCII-lower-case *name* and check it; never Unicode folding.

    :raises InvalidTopic: not ``[a-z0-9_.:-]{1,128}`` once lower-cased, or a
        dot segment (``.``, ``..``), or not a string at all.
    """
    if not isinstance(name, str) or not name.isascii():
        raise InvalidTopic(f"invalid topic {name!r}")
    lowered = name.lower()
    if not is_topic(lowered):
        raise InvalidTopic(f"invalid topic {name!r}")
    return lowered


class Topic:
    """One topic on this instance: its ring (replay window), subscribers and
    counters. A topic without subscribers holds only its ring: no task, no
    timer, no queue entry once its last event was processed."""

    __slots__ = (
        "name",
        "ring",
        "channel",
        "shard",
        "is_queued",
        "fanned",
        "python_subs",
        "multi_channels",
        "published",
        "broadcast",
        "dropped_clients",
        "ring_overwrites",
        "last_activity",
        "lost_upto",
        "python_delivered",
    )

    def __init__(self, name: str, capacity: int, shard: int, lost_upto: int) -> None:
        self.name = name
        self.ring = Ring(capacity)
        self.channel: Channel | None = None
        self.shard = shard
        self.is_queued = False
        self.fanned = 0  # seq of the next message to fan out
        self.python_subs: list[Subscription] = []
        self.multi_channels: list[Channel] = []
        self.published = 0
        self.broadcast = 0
        self.dropped_clients = 0
        self.ring_overwrites = 0
        self.last_activity = time.monotonic()
        # Highest gseq of an event of this topic this instance may have missed
        # or dropped: a resume from an older position cannot be complete.
        self.lost_upto = lost_upto
        self.python_delivered = 0

    @property
    def subscriber_count(self) -> int:
        n = len(self.python_subs)
        if self.channel is not None:
            n += len(self.channel)
        for ch in self.multi_channels:
            n += len(ch)
        return n

    @property
    def has_subscribers(self) -> bool:
        return bool(
            self.python_subs
            or self.multi_channels
            or (self.channel is not None and len(self.channel))
        )


def reset_frame(topic: str) -> bytes:
    """The ``ssepg-reset`` event for *topic*: no ``id:``, so a client keeps
    its last id."""
    return encode_frame(
        None, "ssepg-reset", b'{"topic":"' + topic.encode("ascii") + b'"}'
    )


def topic_memory(t: Topic) -> int:
    """Bytes a topic holds: its window's messages, slots and bookkeeping."""
    return t.ring.nbytes + 8 * t.ring.slots_allocated + 400
