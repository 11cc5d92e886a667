"""The N-instance parts of the local stack: nginx rendered for N upstreams, and the peering of
N instances on one host."""

from __future__ import annotations

from pathlib import Path

import pytest

from rinha.settings import load
from rinha_lab.nginx_conf import render_local
from rinha_lab.stack import peering

NGINX = (Path(__file__).resolve().parents[2] / "nginx.conf").read_text()


def servers(rendered: str) -> list[str]:
    return [line.strip() for line in rendered.splitlines()
            if line.strip().startswith("server ") and line.strip() != "server {"]


@pytest.mark.parametrize("count", [2, 3, 5])
def test_nginx_gets_one_server_line_per_instance_with_the_compose_parameters(count: int) -> None:
    addrs = tuple(f"127.0.0.1:{9001 + i}" for i in range(count))
    rendered = render_local(NGINX, api_addrs=addrs, listen="127.0.0.1:9999", run_dir="/run/x")
    assert servers(rendered) == [f"server {a} fail_timeout=1s;" for a in addrs]
    assert "api1:8080" not in rendered and "api2:8080" not in rendered


def test_a_pair_is_peered_as_compose_spells_it_and_more_with_peers() -> None:
    assert peering("127.0.0.1", [9101, 9102], 1) == {
        "SYNC_HOST": "127.0.0.1", "SYNC_PORT": "9102", "PEER_ADDR": "127.0.0.1:9101"}
    trio = [peering("127.0.0.1", [9101, 9102, 9103], i) for i in range(3)]
    assert [t["PEERS"] for t in trio] == ["127.0.0.1:9102,127.0.0.1:9103",
                                           "127.0.0.1:9101,127.0.0.1:9103",
                                           "127.0.0.1:9101,127.0.0.1:9102"]
    for i, env in enumerate(trio):
        settings = load(env)
        assert settings.sync_port == 9101 + i
        assert len(settings.sync_peers) == 2
        assert ("127.0.0.1", settings.sync_port) not in settings.sync_peers
