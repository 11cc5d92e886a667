"""The README opens with the two commands (set up and run; set up and test), and CI runs exactly
the second one. scripts/check-bare-debian.sh proves them on a bare Debian 12 (not in CI)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def opening_commands() -> list[str]:
    """The commands of the README's first code block, without their comments."""
    block = re.search(r"```sh\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    assert block, "README.md has no sh block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_opens_with_two_commands_that_set_up_first():
    commands = opening_commands()
    assert len(commands) == 2, commands
    assert all(command.startswith("./scripts/setup.sh && .venv/bin/") for command in commands)
    assert commands[0].endswith("rinha stack")
    assert "tox -e " in commands[1]


def test_the_readme_opens_before_any_section():
    text = (REPO / "README.md").read_text()
    assert text.index("```sh") < text.index("\n## ")


def test_ci_runs_exactly_the_readmes_test_command():
    lines = [line for line in (REPO / ".ci/run").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[-1] == opening_commands()[1]


@pytest.mark.parametrize("script", ["scripts/setup.sh", "scripts/check-bare-debian.sh", ".ci/run"])
def test_the_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)
