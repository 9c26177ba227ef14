"""Shared fixtures: a private Postgres database per test session, services on
free ports, and a guard against unexpected warnings.

Postgres: ``SSEPG_TEST_DSN`` (else ``DATABASE_URL``, else the local default)
must reach a server where the role may create databases. Each session works in
a database of its own, so LISTEN/NOTIFY traffic of parallel runs never mixes.
Without a reachable server the Postgres tests skip, except under ``CI=true``,
where they fail.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from support import DEFAULT_TEST_DSN, ServiceFactory, dsn_with_dbname

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _base_dsn() -> str:
    return (
        os.environ.get("SSEPG_TEST_DSN")
        or os.environ.get("DATABASE_URL")
        or DEFAULT_TEST_DSN
    )


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of a fresh database, dropped when the session ends."""
    base = _base_dsn()
    try:
        admin = psycopg.connect(base, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        message = f"Postgres not reachable at the test DSN: {exc}".strip()
        if IN_CI:
            pytest.fail(message + " (CI=true: Postgres tests must not skip)")
        pytest.skip(message)
    name = "ssepg_test_" + uuid.uuid4().hex[:12]
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield dsn_with_dbname(base, name)
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    for item in items:
        if "pg_dsn" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture
def http_server() -> str:
    """Which HTTP server `services` listens with: ssepg's front, or (for
    modules marked ``both_servers``, in a second run) Tornado's own server
    with the Tornado handlers that mount into existing applications."""
    return "front"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if (
        metafunc.definition.get_closest_marker("both_servers") is not None
        and "services" in metafunc.fixturenames
    ):
        metafunc.parametrize("http_server", ["front", "tornado"])


@pytest.fixture
def services(io_loop: Any, http_server: str) -> Iterator[ServiceFactory]:
    """Start services with ``await services.start(**config)``; all are
    closed after the test."""
    factory = ServiceFactory(tornado_server=http_server == "tornado")
    try:
        yield factory
    finally:
        io_loop.run_sync(factory.close_all, timeout=60)


class _WarningGuard(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_unexpected_warnings(request: pytest.FixtureRequest) -> Iterator[_WarningGuard]:
    """Fail a test that logs WARNING or above from ``ssepg`` unless it is
    marked ``@pytest.mark.allow_warnings`` (it provokes them on purpose)."""
    guard = _WarningGuard()
    logger = logging.getLogger("ssepg")
    logger.addHandler(guard)
    try:
        yield guard
    finally:
        logger.removeHandler(guard)
    if request.node.get_closest_marker("allow_warnings") is None and guard.records:
        lines = "\n".join(
            f"{r.name} {r.levelname}: {r.getMessage()}" for r in guard.records
        )
        pytest.fail(f"unexpected warnings logged:\n{lines}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_warnings: the test provokes ssepg warnings on purpose"
    )
    config.addinivalue_line(
        "markers",
        "both_servers: run the test against ssepg's HTTP front and against "
        "Tornado's server with the Tornado handlers",
    )


_skipped_postgres: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if IN_CI and report.skipped and "postgres" in report.keywords:
        _skipped_postgres.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped_postgres:
        print(
            "\nCI=true but these Postgres tests were skipped:\n  "
            + "\n  ".join(_skipped_postgres)
        )
        session.exitstatus = 1
