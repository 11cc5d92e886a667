"""Settings: the only reader of os.environ.

Read once by the supervisor before it forks, then passed down to every child as an argument,
so every process of an instance runs with the same values. A bad value stops startup with a
message naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

CONTEST_DEFAULT_URL = "http://payment-processor-default:8080"
CONTEST_FALLBACK_URL = "http://payment-processor-fallback:8080"


class SettingsError(ValueError):
    """A variable of the environment has a value rinha cannot run with."""


@dataclass(frozen=True)
class Settings:
    instance_name: str
    host: str
    port: int
    workers: int
    processor_default_url: str
    processor_fallback_url: str
    queue_max_messages: int
    hold_capacity: int
    ledger_seconds: int
    dispatch_concurrency: int
    dispatch_batch_s: float
    dispatcher_idle_priority: bool | None  # None: auto (idle when under a CPU quota)
    drain_rate_per_s: int
    fallback_after_s: float
    request_timeout_s: float
    retry_backoff_min_s: float
    retry_backoff_max_s: float
    health_poll: bool
    health_interval_s: float
    peer_addr: tuple[str, int] | None
    sync_host: str
    sync_port: int
    sync_resend_s: float
    sync_recover_timeout_s: float
    sync_drop_rate: float
    admin_token: str | None

    @property
    def queue_name(self) -> str:
        return f"/rinha-{self.instance_name}-queue"

    @property
    def ledger_name(self) -> str:
        return f"/rinha-{self.instance_name}-ledger"

    @property
    def holding_name(self) -> str:
        return f"/rinha-{self.instance_name}-holding"

    @property
    def lock_path(self) -> str:
        return f"/dev/shm/rinha-{self.instance_name}.lock"

    @property
    def processor_urls(self) -> tuple[str, str]:
        """Indexed by processor number: 0 is the default, 1 the fallback."""
        return (self.processor_default_url, self.processor_fallback_url)


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the environment (os.environ unless given)."""
    env = os.environ if environ is None else environ
    read = _Reader(env)
    settings = Settings(
        instance_name=read("INSTANCE_NAME", "rinha", _instance_name),
        host=read("HOST", "0.0.0.0", str),
        port=read("PORT", "8080", _port),
        workers=read("WORKERS", "1", _int_between(1, 64)),
        processor_default_url=read("PROCESSOR_DEFAULT_URL", CONTEST_DEFAULT_URL, _http_url),
        processor_fallback_url=read("PROCESSOR_FALLBACK_URL", CONTEST_FALLBACK_URL, _http_url),
        queue_max_messages=read("QUEUE_MAX_MESSAGES", "1000", _int_between(1, 65536)),
        hold_capacity=read("HOLD_CAPACITY", "65536", _int_between(16, 4_194_304)),
        ledger_seconds=read("LEDGER_SECONDS", "131072", _power_of_two_at_least(1024)),
        dispatch_concurrency=read("DISPATCH_CONCURRENCY", "64", _int_between(1, 1024)),
        dispatch_batch_s=read("DISPATCH_BATCH_S", "0.01", _float_between(0, 1)),
        dispatcher_idle_priority=read("DISPATCHER_IDLE_PRIORITY", "auto", _bool_or_auto),
        drain_rate_per_s=read("DRAIN_RATE_PER_S", "1200", _int_between(1, 1_000_000)),
        fallback_after_s=read("FALLBACK_AFTER_S", "0", _float_between(0, 86400)),
        request_timeout_s=read("REQUEST_TIMEOUT_S", "10", _float_between(0.05, 600)),
        retry_backoff_min_s=read("RETRY_BACKOFF_MIN_S", "0.05", _float_between(0.001, 60)),
        retry_backoff_max_s=read("RETRY_BACKOFF_MAX_S", "0.5", _float_between(0.001, 600)),
        health_poll=read("HEALTH_POLL", "1", _bool),
        health_interval_s=read("HEALTH_INTERVAL_S", "5", _float_between(5, 3600)),
        peer_addr=read("PEER_ADDR", "", _optional_host_port),
        sync_host=read("SYNC_HOST", "0.0.0.0", str),
        sync_port=read("SYNC_PORT", "9000", _port),
        sync_resend_s=read("SYNC_RESEND_S", "1", _float_between(0.05, 3600)),
        sync_recover_timeout_s=read("SYNC_RECOVER_TIMEOUT_S", "1", _float_between(0.1, 60)),
        sync_drop_rate=read("SYNC_DROP_RATE", "0", _float_between(0, 1)),
        admin_token=env.get("RINHA_ADMIN_TOKEN") or None,
    )
    if settings.retry_backoff_min_s > settings.retry_backoff_max_s:
        raise SettingsError("RETRY_BACKOFF_MIN_S must not exceed RETRY_BACKOFF_MAX_S")
    return settings


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def __call__(self, name: str, default: str, parse: Callable[[str], T]) -> T:
        raw = self._env.get(name, default).strip()
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            raise SettingsError(f"{name}={raw!r}: {exc}") from None


def _instance_name(raw: str) -> str:
    # The name is part of the queue and shared-memory names, which allow no slash.
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", raw):
        raise ValueError("use 1-40 letters, digits, '.', '_' or '-'")
    return raw


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


def _float_between(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if not low <= value <= high:  # also rejects NaN
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


_port = _int_between(1, 65535)


def _power_of_two_at_least(low: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if value < low or value & (value - 1):
            raise ValueError(f"must be a power of two, at least {low}")
        return value

    return parse


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("use 1/0, true/false, yes/no or on/off")


def _bool_or_auto(raw: str) -> bool | None:
    if raw.lower() == "auto":
        return None
    try:
        return _bool(raw)
    except ValueError:
        raise ValueError("use auto, or 1/0, true/false, yes/no, on/off") from None


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("must be an http:// URL with a host, e.g. http://127.0.0.1:8001")
    if parts.port == 0:  # parts.port itself raises ValueError for a non-number or > 65535
        raise ValueError("the port must be between 1 and 65535")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError("must be the processor's base URL, without a path or query")
    return raw.rstrip("/")


def _optional_host_port(raw: str) -> tuple[str, int] | None:
    if not raw:
        return None
    host, sep, port = raw.rpartition(":")
    if not sep or not host:
        raise ValueError("must be host:port, e.g. api2:9000")
    return host, _port(port)
