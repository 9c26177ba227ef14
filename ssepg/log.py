"""Named loggers. Only `ssepg.server.main` attaches handlers to them."""

from __future__ import annotations

import logging
import time

broker_log = logging.getLogger("ssepg.broker")
hub_log = logging.getLogger("ssepg.hub")
http_log = logging.getLogger("ssepg.http")
access_log = logging.getLogger("ssepg.access")


class RateLimitedLog:
    """Logs the first of a kind of event at once and then at most one summary
    line per *interval* seconds, so a storm of identical events (a thousand
    slow clients dropped in one burst) costs a few lines, not a thousand."""

    def __init__(self, logger: logging.Logger, level: int, interval: float = 10.0):
        self._logger = logger
        self._level = level
        self._interval = interval
        self._next_at = 0.0
        self._suppressed = 0

    def log(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._suppressed += 1
            return
        if self._suppressed:
            self._logger.log(
                self._level,
                "%d more like the next one since the last report",
                self._suppressed,
            )
            self._suppressed = 0
        self._next_at = now + self._interval
        self._logger.log(self._level, msg, *args)
