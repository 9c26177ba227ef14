"""Named loggers. Only `ssepg.server.main` attaches handlers to them."""

from __future__ import annotations

import asyncio
import logging
import time

broker_log = logging.getLogger("ssepg.broker")
hub_log = logging.getLogger("ssepg.hub")
http_log = logging.getLogger("ssepg.http")
access_log = logging.getLogger("ssepg.access")


class RateLimitedLog:
    """Logs the first of a kind of event at once, then counts the others for
    *interval* seconds and logs their number when it is over, so a storm of
    events (a thousand slow clients dropped in one burst) costs two lines,
    not a thousand. Use it on the event loop's thread."""

    def __init__(self, logger: logging.Logger, level: int, interval: float = 10.0):
        self._logger = logger
        self._level = level
        self._interval = interval
        self._next_at = 0.0
        self._suppressed = 0
        self._first = ""
        self._report_handle: asyncio.TimerHandle | None = None

    def log(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._suppressed += 1
            if self._report_handle is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    return  # reported with the next line logged
                self._report_handle = loop.call_later(self._next_at - now, self.report)
            return
        self.report()
        self._next_at = now + self._interval
        self._first = msg % args if args else msg
        self._logger.log(self._level, "%s", self._first)

    def report(self) -> None:
        """Log how many events were counted without a line of their own."""
        if self._report_handle is not None:
            self._report_handle.cancel()
            self._report_handle = None
        if self._suppressed:
            self._logger.log(
                self._level,
                "%d more within %g s of: %s",
                self._suppressed,
                self._interval,
                self._first,
            )
            self._suppressed = 0
