"""docker-compose.yml against the contest's deployment rules, and its per-service limits.

Runs in whichever process asks, never in a serving instance: the unit tests check the compose
file with `contest_violations` (there is no Docker engine on the development machines or in
CI, so the file is only ever checked statically), and the local stack reads `load_limits` to
hold each local process to the CPU and memory its compose service gets, so that the local
measurements and the shipped limits cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rinha import settings
from rinha.wire import PAYMENT_RECORD_SIZE

__all__ = [
    "CONTEST_CPUS",
    "CONTEST_MEMORY_BYTES",
    "PROCESSOR_NETWORK",
    "ServiceLimits",
    "api_services",
    "contest_violations",
    "load_compose",
    "load_limits",
    "parse_memory",
    "queue_budget_bytes",
    "service_environment",
    "service_limits",
]

# docs/contest.md, deployment rules: "Sum of deploy.resources.limits over all services: at most
# 1.5 CPU and 350 MB". The rule is read against compose values, and Docker parses "350MB" as
# 350 MiB (go-units RAMInBytes: every unit is binary, "MB" == "MiB" == "M"), so MB means 2^20
# here too.
CONTEST_CPUS = 1.5
CONTEST_MEMORY_BYTES = 350 * 2**20
CONTEST_PORT = 9999
PROCESSOR_NETWORK = "payment-processor"

# The kernel's bookkeeping per queued message (struct msg_msg and its share of the rbtree,
# ~50-100 B in docs/measurements.md): with the record itself, what RLIMIT_MSGQUEUE is charged.
QUEUE_KERNEL_BYTES_PER_MESSAGE = 100

_CPU_TOLERANCE = 1e-9
_MEMORY = re.compile(r"(\d+(?:\.\d+)?) ?([kmgtp])?i?b?", re.IGNORECASE)
_UNIT_EXPONENT = {None: 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


@dataclass(frozen=True)
class ServiceLimits:
    """deploy.resources.limits of one compose service."""

    cpus: float
    memory_bytes: int


def load_compose(path: str | Path) -> dict[str, Any]:
    """Parse a compose file (YAML anchors and `<<` merge keys resolved, as Compose does)."""
    with open(path, encoding="utf-8") as file:
        compose = yaml.safe_load(file)
    if not isinstance(compose, dict):
        raise ValueError(f"{path}: not a compose file (top level is not a mapping)")
    return compose


def load_limits(path: str | Path) -> dict[str, ServiceLimits]:
    """The CPU and memory limits of every service in the compose file at `path`."""
    return service_limits(load_compose(path))


def service_limits(compose: Mapping[str, Any]) -> dict[str, ServiceLimits]:
    """The CPU and memory limits of every service; ValueError if one has none."""
    limits = {}
    for name, service in _services(compose).items():
        raw = _limits_mapping(service)
        if "cpus" not in raw or "memory" not in raw:
            raise ValueError(f"service {name} has no deploy.resources.limits cpus and memory")
        limits[name] = ServiceLimits(
            cpus=_parse_cpus(raw["cpus"]), memory_bytes=parse_memory(raw["memory"])
        )
    return limits


def parse_memory(value: str | int) -> int:
    """Bytes in a compose memory value, the way Docker reads it ("160MB" -> 160 * 2**20)."""
    if isinstance(value, bool):
        raise ValueError(f"memory {value!r} is not a size")
    if isinstance(value, int):
        return value
    match = _MEMORY.fullmatch(str(value).strip())
    if match is None:
        raise ValueError(f"memory {value!r} is not a size like '160MB'")
    number, unit = match.groups()
    exponent = _UNIT_EXPONENT[unit.lower() if unit else None]
    return int(float(number) * 1024**exponent)


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment`, either form (mapping or list of NAME=value), as strings."""
    environment = service.get("environment") or {}
    if isinstance(environment, Mapping):
        return {str(k): "" if v is None else _env_string(v) for k, v in environment.items()}
    pairs = (str(item).partition("=") for item in environment)
    return {name: value for name, _, value in pairs}


def api_services(compose: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The services that run rinha: those configured with a processor URL, or named api*."""
    return {
        name: service
        for name, service in _services(compose).items()
        if name.startswith("api") or "PROCESSOR_DEFAULT_URL" in service_environment(service)
    }


def queue_budget_bytes(queue_max_messages: int) -> int:
    """What one full queue of `queue_max_messages` charges against RLIMIT_MSGQUEUE, roughly."""
    return queue_max_messages * (PAYMENT_RECORD_SIZE + QUEUE_KERNEL_BYTES_PER_MESSAGE)


def contest_violations(compose: Mapping[str, Any]) -> list[str]:
    """Every deployment rule the parsed compose file breaks, each as a sentence.

    The contest's rules (docs/contest.md, "Deployment rules") and what an API service needs to
    start at all (docs/architecture.md, invariant 9: a queue the kernel lets it create). Empty
    means compliant.
    """
    return [
        *_limit_violations(compose),
        *_topology_violations(compose),
        *_network_violations(compose),
        *_queue_violations(compose),
    ]


def _limit_violations(compose: Mapping[str, Any]) -> Iterator[str]:
    total_cpus = 0.0
    total_memory = 0
    for name, service in _services(compose).items():
        raw = _limits_mapping(service)
        for key in ("cpus", "memory"):
            if key not in raw:
                yield f"service {name} sets no deploy.resources.limits.{key}"
        try:
            if "cpus" in raw:
                total_cpus += _parse_cpus(raw["cpus"])
            if "memory" in raw:
                total_memory += parse_memory(raw["memory"])
        except ValueError as exc:
            yield f"service {name}: {exc}"
    if total_cpus > CONTEST_CPUS + _CPU_TOLERANCE:
        yield (
            f"the services' CPU limits add up to {total_cpus:g}, over the {CONTEST_CPUS:g} allowed"
        )
    if total_memory > CONTEST_MEMORY_BYTES:
        yield (
            f"the services' memory limits add up to {total_memory / 2**20:g}MB, over the "
            f"{CONTEST_MEMORY_BYTES // 2**20}MB allowed"
        )


def _topology_violations(compose: Mapping[str, Any]) -> Iterator[str]:
    services = _services(compose)
    if not any(_publishes(service, CONTEST_PORT) for service in services.values()):
        yield f"no service publishes port {CONTEST_PORT} (the load balancer's port)"
    apis = api_services(compose)
    if len(apis) < 2:
        yield f"{len(apis)} API service(s); the contest wants at least two behind the load balancer"
    for name, service in services.items():
        if "replicas" in _keys_anywhere(service.get("deploy") or {}):
            yield f"service {name} sets deploy replicas, which the contest forbids"
        if "scale" in service:
            yield f"service {name} sets scale (replicas by another name), which the contest forbids"
        if service.get("network_mode") == "host":
            yield f"service {name} uses network_mode: host; the contest wants bridge networking"
        if service.get("privileged") is True:
            yield f"service {name} runs privileged, which the contest forbids"
        if "image" not in service:
            yield f"service {name} names no image; the contest pulls every image from a registry"
        platform = service.get("platform")
        if platform is not None and platform != "linux/amd64":
            yield f"service {name} runs on {platform}; the contest runs linux/amd64"


def _network_violations(compose: Mapping[str, Any]) -> Iterator[str]:
    networks = compose.get("networks") or {}
    # The keys under which services refer to the processors' network (usually the name itself).
    processor_keys = {
        key
        for key, network in networks.items()
        if _network_name(key, network or {}) == PROCESSOR_NETWORK
    }
    if not processor_keys:
        yield f"no network named {PROCESSOR_NETWORK} is declared (external: true)"
    for key in sorted(processor_keys):
        if not (networks[key] or {}).get("external"):
            yield (
                f"network {key} ({PROCESSOR_NETWORK}) is not declared external: true; the "
                "processors' own compose file creates it"
            )
    for key, network in networks.items():
        if (network or {}).get("driver") == "host":
            yield f"network {key} uses the host driver; the contest wants bridge networking"
    expected = processor_keys or {PROCESSOR_NETWORK}
    for name, service in api_services(compose).items():
        if not expected & set(_service_networks(service)):
            yield f"API service {name} is not on network {PROCESSOR_NETWORK}"


def _queue_violations(compose: Mapping[str, Any]) -> Iterator[str]:
    apis = api_services(compose)
    queue_sizes = {}
    for name, service in apis.items():
        try:
            queue_sizes[name] = settings.load(service_environment(service)).queue_max_messages
        except settings.SettingsError as exc:
            yield f"API service {name} would not start: {exc}"
    # Every API service runs the same image, hence the same uid, and the kernel charges the
    # queues of one uid together across containers: each rlimit must cover all of them.
    needed = sum(queue_budget_bytes(size) for size in queue_sizes.values())
    for name, service in apis.items():
        msg_max = _sysctls(service).get("fs.mqueue.msg_max")
        if msg_max is None:
            yield f"API service {name} sets no sysctls fs.mqueue.msg_max (the default is 10)"
        elif name in queue_sizes and _int_or_zero(msg_max) < queue_sizes[name]:
            yield (
                f"API service {name}: fs.mqueue.msg_max {msg_max} is below its "
                f"QUEUE_MAX_MESSAGES {queue_sizes[name]}"
            )
        msgqueue = _soft_ulimit((service.get("ulimits") or {}).get("msgqueue"))
        if msgqueue is None:
            yield f"API service {name} sets no ulimits msgqueue"
        elif msgqueue < needed:
            yield (
                f"API service {name}: ulimits msgqueue {msgqueue} is below the {needed} bytes "
                "the API services' queues need together (same uid)"
            )


def _services(compose: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {name: service or {} for name, service in (compose.get("services") or {}).items()}


def _limits_mapping(service: Mapping[str, Any]) -> Mapping[str, Any]:
    deploy = service.get("deploy") or {}
    return (deploy.get("resources") or {}).get("limits") or {}


def _parse_cpus(value: object) -> float:
    try:
        cpus = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"cpus {value!r} is not a number") from None
    if not cpus > 0:
        raise ValueError(f"cpus {value!r} must be positive")
    return cpus


def _env_string(value: object) -> str:
    # Compose writes YAML booleans as "true"/"false", not Python's "True".
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _keys_anywhere(node: object) -> Iterator[str]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield str(key)
            yield from _keys_anywhere(value)
    elif isinstance(node, list):
        for item in node:
            yield from _keys_anywhere(item)


def _publishes(service: Mapping[str, Any], port: int) -> bool:
    for entry in service.get("ports") or []:
        if isinstance(entry, Mapping):
            published = entry.get("published")
        else:
            # "[ip:]host:container[/proto]"; a bare "container" publishes on a random port.
            parts = str(entry).split("/")[0].rsplit(":", 2)
            published = parts[-2] if len(parts) >= 2 else None
        if published is not None and str(published) == str(port):
            return True
    return False


def _network_name(key: str, network: Mapping[str, Any]) -> str:
    external = network.get("external")
    if isinstance(external, Mapping) and external.get("name"):  # the legacy external: {name:}
        return str(external["name"])
    return str(network.get("name") or key)


def _service_networks(service: Mapping[str, Any]) -> list[str]:
    networks = service.get("networks") or []
    return [str(key) for key in networks]


def _sysctls(service: Mapping[str, Any]) -> dict[str, str]:
    sysctls = service.get("sysctls") or {}
    if isinstance(sysctls, Mapping):
        return {str(k): str(v) for k, v in sysctls.items()}
    pairs = (str(item).partition("=") for item in sysctls)
    return {name: value for name, _, value in pairs}


def _soft_ulimit(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("soft")
    return _int_or_zero(value)


def _int_or_zero(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0
