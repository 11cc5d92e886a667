"""Settings: the only reader of os.environ.

Read once by the supervisor before it forks, then passed down to every child as an argument,
so every process of an instance runs with the same values. A bad value stops startup with a
message naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from rinha import setting_values as values

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
    ledger_regions: int
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
    peers: tuple[tuple[str, int], ...]
    sync_url: str | None
    sync_host: str
    sync_port: int
    sync_resend_s: float
    sync_recover_timeout_s: float
    sync_drop_rate: float
    sync_drop_seed: int | None
    sync_push: bool
    admin_token: str | None
    heartbeat_timeout_s: float  # 0: hung children are not looked for
    log_level: str
    log_format: str

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
    def metrics_name(self) -> str:
        return f"/rinha-{self.instance_name}-metrics"

    @property
    def heartbeat_name(self) -> str:
        return f"/rinha-{self.instance_name}-heartbeat"

    @property
    def lock_path(self) -> str:
        return f"/dev/shm/rinha-{self.instance_name}.lock"

    @property
    def sync_peers(self) -> tuple[tuple[str, int], ...]:
        """Every other instance to sync with over UDP: PEERS, or the pair's PEER_ADDR."""
        if self.peers:
            return self.peers
        return (self.peer_addr,) if self.peer_addr is not None else ()

    @property
    def processor_urls(self) -> tuple[str, str]:
        """Indexed by processor number: 0 is the default, 1 the fallback."""
        return (self.processor_default_url, self.processor_fallback_url)


@dataclass(frozen=True)
class Variable:
    """One environment variable: the field it fills, its default, how it is read, and what it
    means (printed by `rinha serve --help`; the README's table says the same)."""

    name: str
    field: str
    default: str
    parse: Callable[[str], Any]
    meaning: str


def _variables() -> tuple[Variable, ...]:
    v = Variable
    return (
        v("INSTANCE_NAME", "instance_name", "rinha", values.instance_name,
          "names the queue, segments and lock; one running instance per name"),
        v("HOST", "host", "0.0.0.0", str, "where the workers listen"),
        v("PORT", "port", "8080", values.port, "the workers' port (SO_REUSEPORT)"),
        v("WORKERS", "workers", "1", values.int_between(1, 64), "socketify worker processes"),
        v("PROCESSOR_DEFAULT_URL", "processor_default_url", CONTEST_DEFAULT_URL, values.http_url,
          "the 5 % processor"),
        v("PROCESSOR_FALLBACK_URL", "processor_fallback_url", CONTEST_FALLBACK_URL, values.http_url,
          "the 15 % processor"),
        v("QUEUE_MAX_MESSAGES", "queue_max_messages", "1000", values.int_between(1, 65536),
          "kernel queue length (needs fs.mqueue.msg_max at least this)"),
        v("HOLD_CAPACITY", "hold_capacity", "65536", values.int_between(16, 4_194_304),
          "holding-table slots (64 B each): payments accepted and not yet recorded"),
        v("LEDGER_SECONDS", "ledger_seconds", "131072", values.power_of_two_at_least(1024),
          "seconds the ledger ring keeps (a power of two)"),
        v("LEDGER_REGIONS", "ledger_regions", "16", values.int_between(2, 256),
          "most instances of the deployment (this one and those it mirrors): one ledger region "
          "each, LEDGER_SECONDS x 32 bytes, reserved only once used"),
        v("DISPATCH_CONCURRENCY", "dispatch_concurrency", "64", values.int_between(1, 1024),
          "requests in flight to the processors"),
        v("DISPATCH_BATCH_S", "dispatch_batch_s", "0.01", values.float_between(0, 1),
          "while events keep coming, the dispatcher wakes at most this often (0: each)"),
        v("DISPATCHER_IDLE_PRIORITY", "dispatcher_idle_priority", "auto", values.bool_or_auto,
          "run the dispatcher under SCHED_IDLE; auto: only under a CPU quota"),
        v("DRAIN_RATE_PER_S", "drain_rate_per_s", "1200", values.int_between(1, 1_000_000),
          "at most this many sends start per second"),
        v("FALLBACK_AFTER_S", "fallback_after_s", "0", values.float_between(0, 86400),
          "send a payment held this long to the fallback (0: never)"),
        v("REQUEST_TIMEOUT_S", "request_timeout_s", "10", values.float_between(0.05, 600),
          "a processor reply later than this is an unknown outcome"),
        v("RETRY_BACKOFF_MIN_S", "retry_backoff_min_s", "0.05", values.float_between(0.001, 60),
          "shortest probe spacing while a processor fails"),
        v("RETRY_BACKOFF_MAX_S", "retry_backoff_max_s", "0.5", values.float_between(0.001, 600),
          "longest probe spacing while a processor fails"),
        v("HEALTH_POLL", "health_poll", "1", values.boolean,
          "poll service-health here (1 on exactly one instance of a pair)"),
        v("HEALTH_INTERVAL_S", "health_interval_s", "5", values.float_between(5, 3600),
          "health poll period (the processors allow one call per 5 s)"),
        v("PEER_ADDR", "peer_addr", "", values.optional_host_port,
          "the peer's host:port for UDP sync (empty: alone); the pair's spelling of PEERS"),
        v("PEERS", "peers", "", values.host_ports,
          "every other instance's host:port for UDP sync, comma-separated (N instances)"),
        v("SYNC_URL", "sync_url", "", values.optional_redis_url,
          "redis://host:port/db: sync through Redis instead of UDP (instances on several "
          "hosts; needs the rinha[redis] extra)"),
        v("SYNC_HOST", "sync_host", "0.0.0.0", str, "where sync datagrams are received"),
        v("SYNC_PORT", "sync_port", "9000", values.port, "the sync UDP port"),
        v("SYNC_RESEND_S", "sync_resend_s", "1", values.float_between(0.05, 3600),
          "period of the healing resend"),
        v("SYNC_RECOVER_TIMEOUT_S", "sync_recover_timeout_s", "1", values.float_between(0.1, 60),
          "how long a starting instance waits for its peer's recovery answer"),
        v("SYNC_DROP_RATE", "sync_drop_rate", "0", values.float_between(0, 1),
          "test-only fault: drop this share of outgoing sync datagrams"),
        v("SYNC_DROP_SEED", "sync_drop_seed", "", values.optional_int,
          "test-only: seed of the drops above, for a repeatable run (empty: random)"),
        v("SYNC_PUSH", "sync_push", "1", values.boolean,
          "push recorded cells to the peer at once (0: only the periodic resend carries "
          "them, so the peer lags up to SYNC_RESEND_S)"),
        v("RINHA_ADMIN_TOKEN", "admin_token", "", values.optional_text,
          "if set, POST /purge-payments requires it in X-Rinha-Token"),
        v("HEARTBEAT_TIMEOUT_S", "heartbeat_timeout_s", "10", values.off_or_at_least(2, 3600),
          "replace a child whose loop has not turned for this long of its own time (0: off)"),
        v("LOG_LEVEL", "log_level", "INFO", values.log_level,
          "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
        v("LOG_FORMAT", "log_format", "text", values.one_of("text", "json"),
          "text, or json: one JSON object per line (time, instance, process, level, event)"),
    )


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the environment (os.environ unless given)."""
    env = os.environ if environ is None else environ
    read = _Reader(env)
    settings = Settings(**{v.field: read(v.name, v.default, v.parse) for v in VARIABLES})
    if settings.retry_backoff_min_s > settings.retry_backoff_max_s:
        raise SettingsError("RETRY_BACKOFF_MIN_S must not exceed RETRY_BACKOFF_MAX_S")
    if settings.peer_addr is not None and settings.peers:
        raise SettingsError("PEER_ADDR and PEERS are both set: list every peer in PEERS")
    if settings.sync_url is not None and settings.sync_peers:
        raise SettingsError("SYNC_URL and PEERS (or PEER_ADDR) are both set: one carrier syncs "
                            "an instance, Redis or UDP")
    if len(settings.sync_peers) + 1 > settings.ledger_regions:
        raise SettingsError(f"PEERS lists {len(settings.sync_peers)} instances: with this one "
                            f"that needs LEDGER_REGIONS={len(settings.sync_peers) + 1} at least")
    return settings


def describe() -> str:
    """Every variable with its default and meaning, for `rinha serve --help`."""
    width = max(len(v.name) for v in VARIABLES)
    return "\n".join(
        f"  {v.name:<{width}}  {v.meaning} (default: {v.default or 'empty'})"
        for v in VARIABLES
    )


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def __call__(self, name: str, default: str, parse: Callable[[str], T]) -> T:
        raw = self._env.get(name, default).strip()
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            raise SettingsError(f"{name}={raw!r}: {exc}") from None


VARIABLES = _variables()
