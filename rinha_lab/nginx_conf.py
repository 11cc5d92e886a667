"""The compose file's nginx.conf, rewritten for the local stack.

Runs in the local stack's process, which starts Debian's nginx as a child process because the
development machines and CI have no Docker engine. The stack must run the very file that
docker-compose.yml mounts into the nginx container, so that what is measured locally is what
ships; only the upstream addresses, the listen address and the run-time paths differ. Each
rewrite is anchored on a directive that nginx.conf must contain, and a missing anchor raises
ValueError instead of leaving a compose-only value in place: the two uses cannot drift apart
silently.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

__all__ = ["COMPOSE_LISTEN", "COMPOSE_UPSTREAMS", "RUN_PATH_DIRECTIVES", "render_local"]

# The addresses nginx.conf uses inside compose: the API services' names and PORT.
COMPOSE_UPSTREAMS = ("api1:8080", "api2:8080")
COMPOSE_LISTEN = "9999"

# Directives whose path only makes sense inside the container; the local stack moves each one
# under its run directory, so two stacks (or a system nginx) never share a pid file or temp dir.
RUN_PATH_DIRECTIVES = (
    "pid",
    "error_log",
    "client_body_temp_path",
    "proxy_temp_path",
    "fastcgi_temp_path",
    "uwsgi_temp_path",
    "scgi_temp_path",
)

# Characters that would end or split an nginx token if substituted unquoted.
_UNSAFE = re.compile(r"[\s;{}#'\"\\$]")


def render_local(text: str, *, api_addrs: tuple[str, ...], listen: str, run_dir: str) -> str:
    """Return nginx.conf `text` rewritten to run as a local child process.

    `api_addrs` replace the upstream servers api1:8080 and api2:8080 in that order (e.g.
    ("127.0.0.1:18081", "127.0.0.1:18082") or "unix:/path"); more than two (`rinha stack
    --instances N`) each get a server line of their own after api2's, with api2's parameters
    (such as `fail_timeout=1s`); `listen` replaces `listen 9999`
    (e.g. "127.0.0.1:9999"); every run-time path goes under the absolute directory `run_dir`
    (error_log to run_dir/error.log); `daemon off;` keeps nginx in the foreground so the stack
    can supervise it. Raises ValueError if an anchor is missing or appears more than once, or
    if a value cannot be written into nginx.conf unquoted.
    """
    if len(api_addrs) < 2:
        raise ValueError(f"api_addrs must name two upstreams or more, got {api_addrs!r}")
    if not os.path.isabs(run_dir):
        raise ValueError(f"run_dir must be an absolute path, got {run_dir!r}")
    for value in (*api_addrs, listen, run_dir):
        if not value or _UNSAFE.search(value):
            raise ValueError(f"{value!r} cannot be written into nginx.conf unquoted")

    last = len(COMPOSE_UPSTREAMS) - 1
    for index, compose_addr in enumerate(COMPOSE_UPSTREAMS):
        # The last compose upstream's line is repeated for every address past it.
        local_addrs = api_addrs[index:] if index == last else api_addrs[index:index + 1]
        text = _replace_once(
            text,
            rf"^(\s*server\s+){re.escape(compose_addr)}(?=[\s;])([^\n]*)$",
            lambda m, addrs=local_addrs: "\n".join(m.group(1) + a + m.group(2) for a in addrs),
            anchor=f"server {compose_addr};",
        )
    text = _replace_once(
        text,
        rf"^(\s*listen\s+){COMPOSE_LISTEN}(?=[\s;])",
        lambda m: m.group(1) + listen,
        anchor=f"listen {COMPOSE_LISTEN};",
    )
    for directive in RUN_PATH_DIRECTIVES:
        text = _replace_once(
            text,
            rf"^(\s*{directive}\s+)([^\s;]+)",
            lambda m: m.group(1) + _local_path(run_dir, m.group(2)),
            anchor=f"{directive} <path>;",
        )
    if re.search(r"^\s*daemon\s", text, flags=re.MULTILINE):
        text = _replace_once(
            text, r"^(\s*daemon\s+)\w+", lambda m: m.group(1) + "off", anchor="daemon"
        )
    else:
        text = "daemon off;\n" + text
    return "# Rendered from nginx.conf by rinha_lab/nginx_conf.py: edit that file.\n" + text


def _local_path(run_dir: str, compose_path: str) -> str:
    # error_log may name the special target "stderr" rather than a file.
    name = "error.log" if compose_path == "stderr" else os.path.basename(compose_path)
    return os.path.join(run_dir, name)


def _replace_once(
    text: str, pattern: str, replace: Callable[[re.Match[str]], str], *, anchor: str
) -> str:
    new_text, count = re.subn(pattern, replace, text, flags=re.MULTILINE)
    if count != 1:
        raise ValueError(
            f"nginx.conf must contain `{anchor}` exactly once on a line of its own "
            f"(found {count}); the local stack rewrites it (rinha_lab/nginx_conf.py)"
        )
    return new_text
