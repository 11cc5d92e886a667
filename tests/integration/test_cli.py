"""The command line: every command answers --help without starting anything, refuses what it
does not understand, and names only files that exist in the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rinha.settings import VARIABLES
from tests.processes import free_port, port_open

REPO = Path(__file__).resolve().parents[2]


def rinha(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rinha", *args], capture_output=True,
                          text=True, timeout=30, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", [[], ["serve"], ["stack"], ["processor"]])
def test_help_prints_usage_and_starts_nothing(command):
    port = free_port()
    result = rinha(*command, "--help", env={"PORT": str(port), "HOST": "127.0.0.1"})
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower() or "rinha serve" in result.stdout
    assert not port_open(port)
    # Every file the help names is in the repository.
    for name in re.findall(r"[\w./-]+\.(?:md|ya?ml|conf|py|json)\b", result.stdout):
        assert (REPO / name).exists() or name in ("stack.json",), name


def test_serve_help_lists_every_setting_with_its_default():
    text = rinha("serve", "--help").stdout
    for variable in VARIABLES:
        assert re.search(rf"^  {variable.name} .*\(default: ", text, re.MULTILINE), variable.name


@pytest.mark.parametrize("command", [["serve", "--port", "80"], ["stack", "--bogus"],
                                     ["processor"], ["nonsense"]])
def test_what_a_command_does_not_take_is_refused_with_status_2(command):
    result = rinha(*command)
    assert result.returncode == 2
    assert result.stderr


def test_a_bad_log_level_stops_startup():
    result = rinha("serve", env={"LOG_LEVEL": "bogus", "PORT": str(free_port())})
    assert result.returncode == 2
    assert "LOG_LEVEL" in result.stderr


def test_the_readme_settings_table_matches_the_code():
    readme = (REPO / "README.md").read_text()
    for variable in VARIABLES:
        row = re.search(rf"^\| `{variable.name}`[^|]*\| ([^|]*) \|", readme, re.MULTILINE)
        assert row, f"{variable.name} is missing from the README's settings table"
        default = row.group(1).strip().strip("`")
        assert default == (variable.default or "empty") or variable.default in default, (
            variable.name, default)
