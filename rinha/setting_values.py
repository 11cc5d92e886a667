"""How each setting's text becomes its value: one parser per kind of value.

Used by settings.py only (run once, in the supervisor, before it forks). Each parser takes the
variable's text and returns the value, or raises ValueError saying what a good value looks
like; settings.py adds the variable's name to the message.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urlsplit


def instance_name(raw: str) -> str:
    # The name is part of the queue and shared-memory names, which allow no slash.
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", raw):
        raise ValueError("use 1-40 letters, digits, '.', '_' or '-'")
    return raw


def int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


def float_between(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if not low <= value <= high:  # also rejects NaN
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


port = int_between(1, 65535)


def off_or_at_least(low: float, high: float) -> Callable[[str], float]:
    # Children beat about once a second: a timeout under two beats would kill healthy ones.
    between = float_between(low, high)

    def parse(raw: str) -> float:
        if float(raw) == 0:
            return 0.0
        try:
            return between(raw)
        except ValueError:
            raise ValueError(f"must be 0 (off) or between {low} and {high}") from None

    return parse


def power_of_two_at_least(low: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if value < low or value & (value - 1):
            raise ValueError(f"must be a power of two, at least {low}")
        return value

    return parse


def boolean(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("use 1/0, true/false, yes/no or on/off")


def bool_or_auto(raw: str) -> bool | None:
    if raw.lower() == "auto":
        return None
    try:
        return boolean(raw)
    except ValueError:
        raise ValueError("use auto, or 1/0, true/false, yes/no, on/off") from None


def http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("must be an http:// URL with a host, e.g. http://127.0.0.1:8001")
    if parts.port == 0:  # parts.port itself raises ValueError for a non-number or > 65535
        raise ValueError("the port must be between 1 and 65535")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError("must be the processor's base URL, without a path or query")
    return raw.rstrip("/")


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError(f"use {' or '.join(choices)}")
        return raw.lower()

    return parse


def optional_int(raw: str) -> int | None:
    return int(raw) if raw else None


def optional_text(raw: str) -> str | None:
    return raw or None


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(raw: str) -> str:
    level = raw.upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"use one of {', '.join(_LOG_LEVELS)}")
    return level


def optional_host_port(raw: str) -> tuple[str, int] | None:
    if not raw:
        return None
    host, sep, number = raw.rpartition(":")
    if not sep or not host:
        raise ValueError("must be host:port, e.g. api2:9000")
    return host, port(number)


def host_ports(raw: str) -> tuple[tuple[str, int], ...]:
    if not raw:
        return ()
    addresses = []
    for item in raw.split(","):
        address = optional_host_port(item.strip())
        if address is None:
            raise ValueError("must be host:port,host:port,..., e.g. api2:9000,api3:9000")
        if address in addresses:
            raise ValueError(f"lists {address[0]}:{address[1]} twice")
        addresses.append(address)
    return tuple(addresses)


def optional_redis_url(raw: str) -> str | None:
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("must be a redis:// URL with a host, e.g. redis://10.0.0.5:6379/0")
    parts.port  # noqa: B018 - raises ValueError for a port that is not one
    if parts.path not in ("", "/") and not parts.path.lstrip("/").isdigit():
        raise ValueError("the path is the database number, e.g. redis://host:6379/0")
    return raw
