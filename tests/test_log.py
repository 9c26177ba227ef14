"""The rate-limited log: one line at once, then one count per interval."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ssepg.log import RateLimitedLog

from support import wait_until


@pytest.mark.allow_warnings
@pytest.mark.gen_test(timeout=30)
async def test_a_storm_costs_two_lines_and_the_count_is_never_lost(caplog):
    caplog.set_level(logging.WARNING, logger="ssepg.test")
    log = RateLimitedLog(logging.getLogger("ssepg.test"), logging.WARNING, 0.2)
    for n in range(50):
        log.log("dropped subscriber %d", n)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["dropped subscriber 0"]
    # The count comes when the interval is over, without waiting for a
    # later event to carry it.
    await wait_until(lambda: len(caplog.records) == 2, message="the count")
    assert caplog.records[1].getMessage() == (
        "49 more within 0.2 s of: dropped subscriber 0"
    )
    await asyncio.sleep(0)
    # After the interval, the next event is logged at once again.
    log.log("dropped subscriber %d", 50)
    assert caplog.records[-1].getMessage() == "dropped subscriber 50"
    assert len(caplog.records) == 3
    # A count still open is reported on demand (at shutdown).
    log.log("dropped subscriber %d", 51)
    log.report()
    assert caplog.records[-1].getMessage() == (
        "1 more within 0.2 s of: dropped subscriber 50"
    )
    assert len(caplog.records) == 4
