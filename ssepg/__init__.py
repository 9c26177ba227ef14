"""ssepg: Server-Sent Events fan-out across instances over Postgres LISTEN/NOTIFY."""

from __future__ import annotations

try:
    from . import _fast  # noqa: F401  (the compiled core; checked first)
except ImportError as exc:  # pragma: no cover - depends on how it was installed
    raise ImportError(
        f"ssepg's compiled core (ssepg._fast) is missing from {__path__[0]}: "
        "this is a source tree that was not built. Build it in place with "
        "`pip install -e .`, or run from outside the source tree so that "
        "the installed ssepg is imported"
    ) from exc

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
