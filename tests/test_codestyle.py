"""The code checks run with the tests: ruff (lint and format), mypy strict on
the package, and the stub of the compiled module against its source."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["ssepg", "tests", "bench", "examples", "setup.py"]


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(
        name
    )
    if path is None:
        pytest.fail(f"{name} is not installed (it is part of the test extra)")
    return path


def test_ruff_finds_nothing() -> None:
    result = run(tool("ruff"), "check", *CHECKED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_code_is_formatted() -> None:
    result = run(tool("ruff"), "format", "--check", *CHECKED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_on_the_package() -> None:
    result = run(sys.executable, "-m", "mypy", "ssepg")
    assert result.returncode == 0, result.stdout + result.stderr


def test_stub_names_every_cdef_class_of_the_source() -> None:
    # test_fast checks the stub against the compiled module; this checks it
    # against the source, so a class added to a .pxi without its stub fails
    # before anything is built.
    source = "\n".join(p.read_text() for p in (ROOT / "ssepg").glob("_*.pxi"))
    classes = set(re.findall(r"^cdef class (\w+)", source, re.MULTILINE))
    stub = ast.parse((ROOT / "ssepg" / "_fast.pyi").read_text())
    stubbed = {node.name for node in stub.body if isinstance(node, ast.ClassDef)}
    assert classes <= stubbed, classes - stubbed
