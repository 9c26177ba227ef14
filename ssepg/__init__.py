"""ssepg: Server-Sent Events fan-out across instances over Postgres LISTEN/NOTIFY."""

from __future__ import annotations

from .config import Config
from .errors import (
    BrokerError,
    ConfigError,
    InvalidTopic,
    PayloadTooLarge,
    PublishError,
    SlowConsumer,
    SsepgError,
)
from .hub import Dispatcher
from .service import Service, make_app
from .subscription import Event, Subscription

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "Config",
    "ConfigError",
    "Dispatcher",
    "Event",
    "InvalidTopic",
    "PayloadTooLarge",
    "PublishError",
    "Service",
    "SlowConsumer",
    "SsepgError",
    "Subscription",
    "make_app",
    "__version__",
]
