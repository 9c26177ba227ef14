"""Configuration: machine-fitted defaults, every field from code, environment
and command line, validation, and secrets kept out of sight (design,
section 6)."""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
import os
import pathlib
import subprocess
import sys
from typing import Any

import psutil
import psycopg
import pytest

import ssepg
from ssepg import Config, ConfigError, Service
from ssepg import config as config_module
from ssepg.broker import channel_for
from ssepg.server import build_parser

from support import unique_topic, wait_until

FIELDS = [f.name for f in dataclasses.fields(Config)]
MiB = 1024 * 1024
GiB = 1024 * MiB
PACKAGE_DIR = pathlib.Path(ssepg.__file__).parent

# One valid value per field, different from its default: the text as the
# environment or the command line gives it, and the value it must become.
VALID: dict[str, tuple[str, Any]] = {
    "dsn": ("postgresql://app:s3cret-pw@db.example:5433/app", None),
    "base_path": ("/sse/v1", "/sse/v1"),
    "healthz": ("/status", "/status"),
    "health_port": ("9101", 9101),
    "keep_alive": ("500ms", 0.5),
    "notify_shards": ("16", 16),
    "fanout_shards": ("7", 7),
    "ring_capacity": ("64", 64),
    "client_buffer": ("64KiB", 64 * 1024),
    "cors_origins": (
        "https://a.example, http://b.example:8080",
        ("https://a.example", "http://b.example:8080"),
    ),
    "max_notify_bytes": ("4000", 4000),
    "max_body_bytes": ("1MiB", MiB),
    "max_subscribers": ("123", 123),
    "publish_token": ("pub-Token-1", "pub-Token-1"),
    "listen_token": ("listen-Token-2", "listen-Token-2"),
    "publish_timeout": ("2.5s", 2.5),
    "publish_retries": ("5", 5),
    "graceful_drain": ("2m", 120.0),
    "queue_poll_interval": ("250ms", 0.25),
    "queue_warn_threshold": ("0.25", 0.25),
    "memory_cleanup_interval": ("30", 30.0),
    "topic_idle_timeout": ("1h", 3600.0),
    "memory_pressure_threshold": ("512MiB", 512 * MiB),
}
VALID["dsn"] = (VALID["dsn"][0], VALID["dsn"][0])

# Invalid values given in code, at least one per field.
INVALID: list[tuple[str, Any]] = [
    ("dsn", ""),
    ("dsn", "   "),
    ("dsn", 42),
    ("base_path", "topics"),
    ("base_path", "/"),
    ("base_path", "/a//b"),
    ("base_path", "/topics/"),
    ("base_path", "/a b"),
    ("base_path", None),
    ("healthz", "healthz"),
    ("healthz", "/topics/health"),
    ("healthz", "/metrics"),
    ("health_port", 0),
    ("health_port", 70000),
    ("health_port", "9100"),
    ("health_port", True),
    ("keep_alive", 0),
    ("keep_alive", -1),
    ("keep_alive", math.inf),
    ("keep_alive", "15"),
    ("notify_shards", 0),
    ("notify_shards", 2000),
    ("notify_shards", 8.0),
    ("fanout_shards", 0),
    ("fanout_shards", 4096),
    ("ring_capacity", 1000),
    ("ring_capacity", 0),
    ("ring_capacity", 1 << 21),
    ("client_buffer", 1024),
    ("client_buffer", "1MiB"),
    ("cors_origins", ("ftp://x.example",)),
    ("cors_origins", ("https://a.example/path",)),
    ("cors_origins", (1,)),
    ("cors_origins", 5),
    ("max_notify_bytes", 8000),
    ("max_notify_bytes", 100),
    ("max_body_bytes", 10),
    ("max_subscribers", -1),
    ("publish_token", ""),
    ("publish_token", "with space"),
    ("publish_token", 123),
    ("listen_token", ""),
    ("listen_token", "tab\there"),
    ("publish_timeout", 0),
    ("publish_timeout", math.nan),
    ("publish_retries", -1),
    ("publish_retries", 101),
    ("graceful_drain", -0.5),
    ("graceful_drain", math.inf),
    ("queue_poll_interval", 0),
    ("queue_warn_threshold", 0),
    ("queue_warn_threshold", 1.5),
    ("memory_cleanup_interval", -3),
    ("topic_idle_timeout", 0),
    ("memory_pressure_threshold", MiB),
    ("memory_pressure_threshold", 2.5 * GiB),
]

# Text that cannot be parsed, as the environment or command line gives it.
UNPARSABLE: list[tuple[str, str]] = [
    ("health_port", "http"),
    ("keep_alive", "soon"),
    ("keep_alive", "-1s"),
    ("notify_shards", "eight"),
    ("fanout_shards", "1.5"),
    ("ring_capacity", "lots"),
    ("client_buffer", "1 parsec"),
    ("max_notify_bytes", "7.9k!"),
    ("max_body_bytes", "big"),
    ("max_subscribers", "many"),
    ("publish_timeout", "5 years"),
    ("publish_retries", "twice"),
    ("graceful_drain", "later"),
    ("queue_poll_interval", "often"),
    ("queue_warn_threshold", "half"),
    ("memory_cleanup_interval", "1d"),
    ("topic_idle_timeout", "1w"),
    ("memory_pressure_threshold", "1TB!"),
]


def test_tables_cover_every_field():
    assert set(VALID) == set(FIELDS)
    assert {name for name, _ in INVALID} == set(FIELDS)


def test_config_fields_lists_the_dataclass_fields_in_order():
    assert [f.name for f in config_module.config_fields()] == FIELDS


# Machine-fitted defaults ---------------------------------------------------


def test_default_logs_two_plain_lines_detected_then_chosen(caplog):
    caplog.set_level(logging.INFO, logger="ssepg")
    config = Config.default()
    records = [r for r in caplog.records if r.name == "ssepg.config"]
    assert len(records) == 2
    detected, chosen = (r.getMessage() for r in records)
    for line in (detected, chosen):
        assert line.isascii() and line.isprintable()
        assert all(r.levelno == logging.INFO for r in records)
    assert detected.startswith("detected ")
    assert "cores" in detected and "memory" in detected
    assert chosen.startswith("chose ")
    assert f"fanout_shards={config.fanout_shards}" in chosen
    assert f"ring_capacity={config.ring_capacity}" in chosen
    assert "client_buffer=" in chosen
    assert "memory_pressure_threshold=" in chosen
    assert "notify_shards=8" in chosen


def test_default_detects_no_more_than_the_machine_has():
    cores, memory, source = config_module.detect_resources()
    assert 1 <= cores <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert cores <= len(os.sched_getaffinity(0))
    assert 0 < memory <= psutil.virtual_memory().total
    assert isinstance(source, str) and source


def test_default_logs_final_values_when_overridden(caplog):
    caplog.set_level(logging.INFO, logger="ssepg.config")
    config = Config.default(fanout_shards=3, ring_capacity=32, notify_shards=12)
    assert (config.fanout_shards, config.ring_capacity, config.notify_shards) == (
        3,
        32,
        12,
    )
    chosen = [r.getMessage() for r in caplog.records if r.name == "ssepg.config"][1]
    assert "fanout_shards=3" in chosen
    assert "ring_capacity=32" in chosen
    assert "notify_shards=12" in chosen


def test_notify_shards_stay_eight_whatever_the_machine(tmp_path, monkeypatch):
    big = _fake_cgroup_v2(tmp_path / "big", cpu_max="6400000 100000", memory_max=None)
    small = _fake_cgroup_v2(
        tmp_path / "small", cpu_max="50000 100000", memory_max=str(256 * MiB)
    )
    seen = set()
    for root in (big, small):
        monkeypatch.setattr(config_module, "SYSTEM_ROOT", str(root))
        seen.add(Config.default().notify_shards)
    assert seen == {8}
    assert Config.default(notify_shards=3).notify_shards == 3


def _write(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fake_cgroup_v2(
    root: pathlib.Path,
    cpu_max: str,
    memory_max: str | None,
    parent_memory_max: str | None = None,
) -> pathlib.Path:
    """A directory tree like a unified (v2) cgroup host where this process
    lives in /system.slice/app.service."""
    _write(root / "proc/self/cgroup", "0::/system.slice/app.service\n")
    _write(
        root / "proc/self/mountinfo",
        "22 1 0:21 / / rw,relatime - ext4 /dev/sda1 rw\n"
        "35 22 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n",
    )
    node = root / "sys/fs/cgroup/system.slice/app.service"
    _write(node / "cpu.max", cpu_max + "\n")
    _write(node / "memory.max", (memory_max or "max") + "\n")
    _write(
        root / "sys/fs/cgroup/system.slice/memory.max",
        (parent_memory_max or "max") + "\n",
    )
    _write(root / "sys/fs/cgroup/system.slice/cpu.max", "max 100000\n")
    return root


def test_cgroup_v2_limits_are_respected(tmp_path, monkeypatch):
    root = _fake_cgroup_v2(tmp_path, cpu_max="50000 100000", memory_max=str(512 * MiB))
    cores, memory, source = config_module.detect_resources(str(root))
    assert cores == 1
    assert memory == 512 * MiB
    assert "cgroup cpu quota" in source and "cgroup memory limit" in source
    monkeypatch.setattr(config_module, "SYSTEM_ROOT", str(root))
    config = Config.default()
    # A half-core, 512 MiB container gets the small end of every choice.
    assert config.fanout_shards == 4
    assert config.ring_capacity == 256
    assert config.client_buffer == 256 * 1024
    assert config.memory_pressure_threshold == int(512 * MiB * 0.6)
    assert config.max_subscribers <= 512 * MiB // (256 * 1024)


def test_cgroup_v2_limit_of_a_parent_applies(tmp_path):
    root = _fake_cgroup_v2(
        tmp_path,
        cpu_max="max 100000",
        memory_max="max",
        parent_memory_max=str(300 * MiB),
    )
    _, memory, source = config_module.detect_resources(str(root))
    assert memory == 300 * MiB
    assert source == "cgroup memory limit"


def test_cgroup_v1_limits_of_the_own_cgroup_are_respected(tmp_path):
    # A v1 host whose cgroup mounts show the whole hierarchy: the process's
    # limits live at its own node, not at the mount's top.
    _write(
        tmp_path / "proc/self/cgroup",
        "4:memory:/jobs/job-7\n3:cpu,cpuacct:/jobs/job-7\n0::/\n",
    )
    _write(
        tmp_path / "proc/self/mountinfo",
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n",
    )
    unlimited = "9223372036854771712\n"
    _write(tmp_path / "sys/fs/cgroup/memory/memory.limit_in_bytes", unlimited)
    _write(tmp_path / "sys/fs/cgroup/memory/jobs/memory.limit_in_bytes", unlimited)
    _write(
        tmp_path / "sys/fs/cgroup/memory/jobs/job-7/memory.limit_in_bytes",
        str(768 * MiB) + "\n",
    )
    _write(tmp_path / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    _write(
        tmp_path / "sys/fs/cgroup/cpu,cpuacct/jobs/job-7/cpu.cfs_quota_us", "100000\n"
    )
    _write(
        tmp_path / "sys/fs/cgroup/cpu,cpuacct/jobs/job-7/cpu.cfs_period_us", "100000\n"
    )
    cores, memory, _ = config_module.detect_resources(str(tmp_path))
    assert memory == 768 * MiB
    assert cores == 1


def test_no_cgroup_limits_leave_the_host_figures(tmp_path):
    root = _fake_cgroup_v2(tmp_path, cpu_max="max 100000", memory_max="max")
    cores, memory, source = config_module.detect_resources(str(root))
    assert memory == psutil.virtual_memory().total
    assert cores == (psutil.cpu_count() or 1)
    assert source == "no cgroup limits"


# Every field from code, environment and command line -----------------------


def test_every_field_settable_in_code():
    values = {name: expected for name, (_, expected) in VALID.items()}
    config = Config(**values)
    for name, expected in values.items():
        assert getattr(config, name) == expected, name
    changed = Config().replace(**values)
    assert changed == config


def test_every_field_from_environment():
    environ = {config_module.env_name(name): text for name, (text, _) in VALID.items()}
    config = Config.from_env(environ, base=Config())
    for name, (_, expected) in VALID.items():
        assert getattr(config, name) == expected, name


def test_database_url_sets_the_dsn_and_ssepg_dsn_wins():
    dsn = "postgresql://postgres@127.0.0.1:5432/app"
    assert Config.from_env({"DATABASE_URL": dsn}, base=Config()).dsn == dsn
    both = {"DATABASE_URL": dsn, "SSEPG_DSN": dsn + "2"}
    assert Config.from_env(both, base=Config()).dsn == dsn + "2"


def test_from_env_without_base_starts_from_the_fitted_defaults(caplog):
    caplog.set_level(logging.INFO, logger="ssepg.config")
    config = Config.from_env({"SSEPG_RING_CAPACITY": "128"})
    assert config.ring_capacity == 128
    assert config.fanout_shards == Config.default().fanout_shards
    assert any(r.getMessage().startswith("detected ") for r in caplog.records)


def test_every_field_from_command_line_flags():
    argv = []
    for name, (text, _) in VALID.items():
        argv += ["--" + name.replace("_", "-"), text]
    args = build_parser().parse_args(argv + ["--port", "9000"])
    config = Config.from_args(args, base=Config())
    for name, (_, expected) in VALID.items():
        assert getattr(config, name) == expected, name
    assert args.port == 9000


def test_flags_win_over_environment_which_wins_over_defaults():
    env_config = Config.from_env(
        {"SSEPG_KEEP_ALIVE": "20", "SSEPG_RING_CAPACITY": "32"}, base=Config()
    )
    args = build_parser().parse_args(["--keep-alive", "3s"])
    config = Config.from_args(args, base=env_config)
    assert config.keep_alive == 3.0
    assert config.ring_capacity == 32
    assert config.max_subscribers == Config().max_subscribers


def test_from_args_reads_the_process_environment(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ssepg.config")
    monkeypatch.setenv("SSEPG_TOPIC_IDLE_TIMEOUT", "90s")
    monkeypatch.setenv("SSEPG_MAX_SUBSCRIBERS", "77")
    args = build_parser().parse_args(["--max-subscribers", "78"])
    config = Config.from_args(args)
    assert config.topic_idle_timeout == 90.0
    assert config.max_subscribers == 78


def test_help_lists_a_flag_and_variable_for_every_field():
    result = subprocess.run(
        [sys.executable, "-m", "ssepg", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in text, name
        assert "SSEPG_" + name.upper() in text, name
    for option in ("--port", "--host", "--processes"):
        assert option in text
    assert text.isascii()


# Validation ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), INVALID, ids=lambda v: repr(v)[:30])
def test_invalid_value_raises_config_error_naming_the_field(name, value):
    with pytest.raises(ConfigError) as info:
        Config(**{name: value})
    assert info.value.field == name
    assert str(info.value).startswith(name + ": ")
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError) as info:
        Config().replace(**{name: value})
    assert info.value.field == name


@pytest.mark.parametrize(("name", "text"), UNPARSABLE, ids=lambda v: str(v)[:30])
def test_unparsable_text_raises_config_error_naming_field_and_source(name, text):
    variable = config_module.env_name(name)
    with pytest.raises(ConfigError) as info:
        Config.from_env({variable: text}, base=Config())
    assert info.value.field == name
    assert variable in str(info.value)
    args = build_parser().parse_args(["--" + name.replace("_", "-") + "=" + text])
    with pytest.raises(ConfigError) as info:
        Config.from_args(args, base=Config())
    assert info.value.field == name
    assert "--" + name.replace("_", "-") in str(info.value)


def test_valid_env_text_that_breaks_a_rule_names_the_field():
    with pytest.raises(ConfigError) as info:
        Config.from_env({"SSEPG_RING_CAPACITY": "1000"}, base=Config())
    assert info.value.field == "ring_capacity"


def test_bad_command_line_value_exits_with_the_field_named():
    result = subprocess.run(
        [sys.executable, "-m", "ssepg", "--ring-capacity", "1000"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("SSEPG_")},
    )
    assert result.returncode == 2
    assert "ring_capacity" in result.stderr


def test_cors_origins_accept_a_list_or_comma_separated_text_in_code():
    assert Config(cors_origins=["https://a.example"]).cors_origins == (
        "https://a.example",
    )
    assert Config(cors_origins="*, https://b.example").cors_origins == (
        "*",
        "https://b.example",
    )


def test_health_port_zero_or_off_in_text_means_none():
    for text in ("0", "off", "none", ""):
        config = Config.from_env(
            {"SSEPG_HEALTH_PORT": text}, base=Config(health_port=9)
        )
        assert config.health_port is None


# Secrets -------------------------------------------------------------------


SECRET_DSN = "postgresql://app:Pg-Pass-5150@db.example:5432/app?sslmode=require"
KEYWORD_DSN = "host=db.example user=app password='Kw Pass 77' dbname=app"


def test_repr_never_shows_tokens_or_dsn_password():
    config = Config(
        dsn=SECRET_DSN, publish_token="Pub-Secret-1", listen_token="Lis-Secret-2"
    )
    for text in (repr(config), str(config), repr([config]), str(config.redacted())):
        assert "Pub-Secret-1" not in text
        assert "Lis-Secret-2" not in text
        assert "Pg-Pass-5150" not in text
        assert "db.example" in text
    keyword = Config(dsn=KEYWORD_DSN)
    assert "Kw Pass 77" not in repr(keyword)
    assert "password=***" in repr(keyword)
    assert "publish_token=None" in repr(Config())


def test_errors_never_show_a_secret_value():
    with pytest.raises(ConfigError) as info:
        Config(publish_token="half secret")
    assert "half secret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        Config(listen_token=b"bytes-secret")
    assert "bytes-secret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        Config(dsn=b"postgresql://u:Bytes-Pw@h/db")
    assert "Bytes-Pw" not in str(info.value)


def test_help_never_shows_a_secret_from_the_environment():
    env = {
        **os.environ,
        "SSEPG_PUBLISH_TOKEN": "Env-Secret-9",
        "DATABASE_URL": SECRET_DSN,
    }
    result = subprocess.run(
        [sys.executable, "-m", "ssepg", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0
    assert "Env-Secret-9" not in result.stdout + result.stderr
    assert "Pg-Pass-5150" not in result.stdout + result.stderr


# Every field is used -------------------------------------------------------


def test_every_field_is_read_outside_the_config_module():
    read: set[str] = set()
    for path in PACKAGE_DIR.glob("*.py"):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in FIELDS:
                read.add(node.attr)
    assert read == set(FIELDS), sorted(set(FIELDS) - read)


@pytest.mark.gen_test(timeout=60)
async def test_every_field_reaches_the_part_that_acts_on_it(pg_dsn):
    settings = {name: expected for name, (_, expected) in VALID.items()}
    settings.update(dsn=pg_dsn, health_port=None, memory_pressure_threshold=GiB)
    service = await Service.start(Config(**settings))
    try:
        await wait_until(lambda: service.broker.is_connected, message="listener up")
        d = service.dispatcher
        assert d.ring_capacity == 64
        assert d.fanout_shards == 7
        assert d.client_buffer == 64 * 1024
        assert d.keep_alive == 0.5
        assert d.topic_idle_timeout == 3600.0
        assert service.broker.channels == [f"topic_broadcast_{i}" for i in range(16)]
        routes = [r[0] for r in service.routes()]
        assert "/sse/v1" in routes and "/status" in routes
        # notify_shards decides the Postgres channel an event travels on.
        topic = unique_topic()
        channel = channel_for(topic, 16)
        async with await psycopg.AsyncConnection.connect(
            pg_dsn, autocommit=True
        ) as conn:
            await conn.execute(f"LISTEN {channel}")
            await service.publish(topic, {"n": 1})
            async for note in conn.notifies(timeout=20):
                if topic in note.payload:
                    assert note.channel == channel
                    break
            else:
                pytest.fail("the event never reached its channel")
    finally:
        await service.close(drain=0)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "99999"], {}, "argument --port: must be a TCP port (0-65535)"),
        (["--port", "-5"], {}, "argument --port: must be a TCP port (0-65535)"),
        (["--port", "http"], {}, "argument --port: must be a TCP port (0-65535)"),
        ([], {"SSEPG_PORT": "70000"}, "argument --port: must be a TCP port"),
        ([], {"SSEPG_PROCESSES": "two"}, "argument --processes: must be an integer"),
        ([], {"SSEPG_LOG_LEVEL": "loud"}, "SSEPG_LOG_LEVEL: must be one of debug,"),
        ([], {"SSEPG_LOG_LEVEL": ""}, "SSEPG_LOG_LEVEL: must be one of debug,"),
        ([], {"SSEPG_LOOP": "trio"}, "SSEPG_LOOP: must be one of auto, uvloop,"),
        (
            ["--port", "0", "--processes", "2"],
            {"DATABASE_URL": "postgresql://db/x"},
            "--processes above 1 needs a fixed --port",
        ),
    ],
)
def test_bad_server_options_exit_2_with_a_clear_message(argv, env, message):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SSEPG_")}
    clean.pop("DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "ssepg", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
