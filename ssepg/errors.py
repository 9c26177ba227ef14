"""Exceptions raised by ssepg."""

from __future__ import annotations

__all__ = [
    "SsepgError",
    "ConfigError",
    "PublishError",
    "PayloadTooLarge",
    "InvalidTopic",
    "BrokerError",
    "SlowConsumer",
]


class SsepgError(Exception):
    """Base class of every error ssepg raises on purpose."""


class ConfigError(SsepgError, ValueError):
    """A configuration value is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class PublishError(SsepgError):
    """An event could not be published."""


class InvalidTopic(PublishError, ValueError):
    """The topic id does not match ``[a-z0-9_.:-]{1,128}``."""


class PayloadTooLarge(PublishError, ValueError):
    """The event does not fit: ``size`` bytes against a ``limit``."""

    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(f"{message}: {size} bytes, limit {limit}")
        self.size = size
        self.limit = limit


class BrokerError(PublishError):
    """The broker could not take the event in time (Postgres unreachable,
    publish timeout, or the service is closing)."""


class SlowConsumer(SsepgError):
    """A subscription fell further behind than its buffer allows and was
    ended."""
