"""docker-compose.yml and nginx.conf against the contest's deployment rules.

There is no Docker engine here or in CI, so these static checks are all that stands between a
compose edit and a disqualified submission: each rule is shown to hold for the real file and to
be reported when broken.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rinha import settings
from rinha_lab.compose_limits import (
    CONTEST_CPUS,
    CONTEST_MEMORY_BYTES,
    api_services,
    contest_violations,
    load_compose,
    load_limits,
    parse_memory,
    queue_budget_bytes,
    service_environment,
)
from rinha_lab.nginx_conf import COMPOSE_LISTEN, COMPOSE_UPSTREAMS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = ROOT / "docker-compose.yml"
NGINX_PATH = ROOT / "nginx.conf"

Compose = dict[str, Any]


@pytest.fixture
def compose() -> Compose:
    # A JSON round trip rather than copy.deepcopy: the file shares blocks between api1 and api2
    # through YAML anchors, deepcopy would keep them shared, and a mutation meant for one
    # service would silently change the other too.
    return json.loads(json.dumps(load_compose(COMPOSE_PATH)))


def test_the_compose_file_breaks_no_rule(compose: Compose) -> None:
    assert contest_violations(compose) == []


def _svc(compose: Compose, service: str) -> dict[str, Any]:
    return compose["services"][service]


def _limits(compose: Compose, service: str) -> dict[str, Any]:
    return compose["services"][service]["deploy"]["resources"]["limits"]


def _env(compose: Compose, service: str) -> dict[str, Any]:
    return compose["services"][service]["environment"]


def _add_unlisted_api(compose: Compose) -> None:
    # Found by its environment, not its name; it takes api2's budget so only the network rule
    # is broken.
    extra = json.loads(json.dumps(compose["services"].pop("api2")))
    extra["networks"] = ["backend"]
    compose["services"]["payments"] = extra


BREAKS = [
    pytest.param(
        lambda c: _limits(c, "nginx").update(cpus="0.21"), "CPU limits add up", id="cpu total"
    ),
    pytest.param(
        lambda c: _limits(c, "api1").update(memory="161MB"), "memory limits add", id="memory total"
    ),
    pytest.param(
        lambda c: _limits(c, "api2").pop("cpus"),
        "api2 sets no deploy.resources.limits.cpus",
        id="no cpus",
    ),
    pytest.param(
        lambda c: _limits(c, "nginx").pop("memory"),
        "nginx sets no deploy.resources.limits.memory",
        id="no memory",
    ),
    pytest.param(
        lambda c: _svc(c, "nginx").pop("deploy"), "nginx sets no deploy.resources", id="no deploy"
    ),
    pytest.param(
        lambda c: _limits(c, "api1").update(cpus="lots"),
        "cpus 'lots' is not a number",
        id="bad cpus",
    ),
    pytest.param(
        lambda c: _svc(c, "nginx").update(ports=["9998:9999"]),
        "publishes port 9999",
        id="9999 unpublished",
    ),
    pytest.param(
        lambda c: _svc(c, "nginx").update(ports=["9999"]),
        "publishes port 9999",
        id="9999 random host port",
    ),
    pytest.param(
        lambda c: _svc(c, "api1")["deploy"].update(replicas=2),
        "api1 sets deploy replicas",
        id="replicas",
    ),
    pytest.param(lambda c: _svc(c, "api2").update(scale=2), "api2 sets scale", id="scale"),
    pytest.param(
        lambda c: _svc(c, "nginx").update(network_mode="host"),
        "nginx uses network_mode: host",
        id="host network",
    ),
    pytest.param(
        lambda c: c["networks"]["backend"].update(driver="host"),
        "network backend uses the host driver",
        id="host driver",
    ),
    pytest.param(
        lambda c: _svc(c, "api1").update(privileged=True), "api1 runs privileged", id="privileged"
    ),
    pytest.param(lambda c: _svc(c, "api2").pop("image"), "api2 names no image", id="no image"),
    pytest.param(
        lambda c: _svc(c, "api1").update(platform="linux/arm64"),
        "api1 runs on linux/arm64",
        id="arm",
    ),
    pytest.param(lambda c: c["services"].pop("api2"), "at least two", id="one api"),
    pytest.param(
        lambda c: _svc(c, "api2").update(networks=["backend"]),
        "API service api2 is not on network payment-processor",
        id="api off processors",
    ),
    pytest.param(
        lambda c: _svc(c, "api1").pop("networks"),
        "API service api1 is not on network payment-processor",
        id="api on default network",
    ),
    pytest.param(
        _add_unlisted_api,
        "API service payments is not on network payment-processor",
        id="unnamed api off processors",
    ),
    pytest.param(
        lambda c: c["networks"]["payment-processor"].update(external=False),
        "is not declared external",
        id="not external",
    ),
    pytest.param(
        lambda c: c["networks"].pop("payment-processor"),
        "no network named payment-processor",
        id="processor network undeclared",
    ),
    pytest.param(
        lambda c: _svc(c, "api1").pop("sysctls"),
        "api1 sets no sysctls fs.mqueue.msg_max",
        id="no msg_max",
    ),
    pytest.param(
        lambda c: _svc(c, "api2")["sysctls"].update({"fs.mqueue.msg_max": "10"}),
        "below its QUEUE_MAX_MESSAGES",
        id="short msg_max",
    ),
    pytest.param(
        lambda c: _svc(c, "api2").pop("ulimits"), "api2 sets no ulimits msgqueue", id="no msgqueue"
    ),
    pytest.param(
        lambda c: _svc(c, "api1")["ulimits"].update(msgqueue=200_000),
        "api1: ulimits msgqueue 200000 is below",
        id="short msgqueue",
    ),
    pytest.param(
        lambda c: _env(c, "api1").update(QUEUE_MAX_MESSAGES="0"),
        "api1 would not start: QUEUE_MAX_MESSAGES",
        id="bad setting",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), BREAKS)
def test_each_broken_rule_is_reported(
    compose: Compose, mutate: Callable[[Compose], None], expected: str
) -> None:
    mutate(compose)
    violations = contest_violations(compose)
    assert any(expected in violation for violation in violations), violations


def test_a_queue_size_past_both_queue_settings_is_reported(compose: Compose) -> None:
    for name in ("api1", "api2"):
        _env(compose, name)["QUEUE_MAX_MESSAGES"] = "5000"
    violations = contest_violations(compose)
    assert sum("below its QUEUE_MAX_MESSAGES 5000" in v for v in violations) == 2, violations
    assert sum("ulimits msgqueue 524288 is below" in v for v in violations) == 2, violations


def test_the_queue_settings_fit_the_configured_queue(compose: Compose) -> None:
    apis = api_services(compose)
    sizes = {
        name: settings.load(service_environment(s)).queue_max_messages for name, s in apis.items()
    }
    for name, service in apis.items():
        assert int(service["sysctls"]["fs.mqueue.msg_max"]) >= sizes[name]
        # Same uid in both containers: the kernel charges both queues to one budget.
        assert int(service["ulimits"]["msgqueue"]) >= sum(map(queue_budget_bytes, sizes.values()))


def test_limits_fit_the_contest_budget() -> None:
    limits = load_limits(COMPOSE_PATH)
    assert set(limits) == {"nginx", "api1", "api2"}
    assert sum(limit.cpus for limit in limits.values()) <= CONTEST_CPUS + 1e-9
    assert sum(limit.memory_bytes for limit in limits.values()) <= CONTEST_MEMORY_BYTES
    assert limits["api1"] == limits["api2"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("160MB", 160 * 2**20),
        ("160M", 160 * 2**20),
        ("160mb", 160 * 2**20),
        ("160MiB", 160 * 2**20),
        ("512k", 512 * 2**10),
        ("1.5GB", 3 * 2**29),
        ("1g", 2**30),
        ("4096", 4096),
        (4096, 4096),
    ],
)
def test_memory_is_read_the_way_docker_reads_it(value: str | int, expected: int) -> None:
    assert parse_memory(value) == expected


@pytest.mark.parametrize("value", ["", "MB", "160 megabytes", "-5MB", True])
def test_a_malformed_memory_value_is_refused(value: object) -> None:
    with pytest.raises(ValueError):
        parse_memory(value)  # type: ignore[arg-type]


def test_nginx_upstreams_are_the_api_services(compose: Compose) -> None:
    text = NGINX_PATH.read_text(encoding="utf-8")
    block = re.search(r"upstream\s+api\s*\{(.*?)\}", text, flags=re.DOTALL)
    assert block is not None, "nginx.conf has no `upstream api` block"
    upstreams = re.findall(r"^\s*server\s+([^\s;]+)", block.group(1), flags=re.MULTILINE)
    expected = [
        f"{name}:{settings.load(service_environment(service)).port}"
        for name, service in api_services(compose).items()
    ]
    assert sorted(upstreams) == sorted(expected)
    # The local stack rewrites exactly these addresses (rinha_lab/nginx_conf.py).
    assert sorted(COMPOSE_UPSTREAMS) == sorted(expected)


def test_nginx_listens_on_the_published_port(compose: Compose) -> None:
    text = NGINX_PATH.read_text(encoding="utf-8")
    nginx = compose["services"]["nginx"]
    assert re.findall(r"^\s*listen\s+(\d+)", text, flags=re.MULTILINE) == [COMPOSE_LISTEN]
    assert f"9999:{COMPOSE_LISTEN}" in nginx["ports"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]


def test_each_api_syncs_with_the_other_and_one_polls_health(compose: Compose) -> None:
    apis = {
        name: settings.load(service_environment(service))
        for name, service in api_services(compose).items()
    }
    assert set(apis) == {"api1", "api2"}
    assert apis["api1"].peer_addr == ("api2", apis["api2"].sync_port)
    assert apis["api2"].peer_addr == ("api1", apis["api1"].sync_port)
    # The processors allow one service-health call per 5 s for all callers together.
    assert [name for name, s in apis.items() if s.health_poll] == ["api1"]


def test_every_service_comes_back_after_a_crash(compose: Compose) -> None:
    for name, service in compose["services"].items():
        assert service.get("restart") == "unless-stopped", name
