"""settings: defaults, every variable, and a bad value of each kind naming its variable."""

from __future__ import annotations

import dataclasses

import pytest

from rinha.settings import SettingsError, load


def test_defaults_with_an_empty_environment() -> None:
    settings = load({})
    assert dataclasses.asdict(settings) == {
        "instance_name": "rinha",
        "host": "0.0.0.0",
        "port": 8080,
        "workers": 1,
        "processor_default_url": "http://payment-processor-default:8080",
        "processor_fallback_url": "http://payment-processor-fallback:8080",
        "queue_max_messages": 1000,
        "hold_capacity": 65536,
        "ledger_seconds": 131072,
        "ledger_regions": 16,
        "dispatch_concurrency": 64,
        "dispatch_batch_s": 0.01,
        "dispatcher_idle_priority": None,
        "drain_rate_per_s": 1200,
        "fallback_after_s": 0.0,
        "request_timeout_s": 10.0,
        "retry_backoff_min_s": 0.05,
        "retry_backoff_max_s": 0.5,
        "health_poll": True,
        "health_interval_s": 5.0,
        "peer_addr": None,
        "peers": (),
        "sync_url": None,
        "sync_host": "0.0.0.0",
        "sync_port": 9000,
        "sync_resend_s": 1.0,
        "sync_recover_timeout_s": 1.0,
        "sync_drop_rate": 0.0,
        "sync_drop_seed": None,
        "sync_push": True,
        "admin_token": None,
        "heartbeat_timeout_s": 10.0,
        "log_level": "INFO",
        "log_format": "text",
    }


def test_load_reads_os_environ_when_given_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTANCE_NAME", "from-os-environ")
    monkeypatch.setenv("PORT", "9123")
    settings = load()
    assert (settings.instance_name, settings.port) == ("from-os-environ", 9123)


@pytest.mark.parametrize(
    ("variable", "raw", "field", "value"),
    [
        ("INSTANCE_NAME", "api1", "instance_name", "api1"),
        ("INSTANCE_NAME", "a.b_c-D9", "instance_name", "a.b_c-D9"),
        ("HOST", "127.0.0.1", "host", "127.0.0.1"),
        ("PORT", "9999", "port", 9999),
        ("PORT", " 81 ", "port", 81),  # surrounding blanks are stripped
        ("PORT", "65535", "port", 65535),
        ("WORKERS", "4", "workers", 4),
        ("PROCESSOR_DEFAULT_URL", "http://127.0.0.1:8001", "processor_default_url",
         "http://127.0.0.1:8001"),
        ("PROCESSOR_DEFAULT_URL", "http://127.0.0.1:8001/", "processor_default_url",
         "http://127.0.0.1:8001"),  # the trailing slash goes: "/payments" is appended
        ("PROCESSOR_FALLBACK_URL", "http://pf:8002", "processor_fallback_url", "http://pf:8002"),
        ("QUEUE_MAX_MESSAGES", "10", "queue_max_messages", 10),
        ("HOLD_CAPACITY", "16", "hold_capacity", 16),
        ("LEDGER_SECONDS", "1024", "ledger_seconds", 1024),
        ("LEDGER_SECONDS", "262144", "ledger_seconds", 262144),
        ("DISPATCH_CONCURRENCY", "8", "dispatch_concurrency", 8),
        ("DISPATCH_BATCH_S", "0", "dispatch_batch_s", 0.0),
        ("DISPATCH_BATCH_S", "0.02", "dispatch_batch_s", 0.02),
        ("DISPATCHER_IDLE_PRIORITY", "0", "dispatcher_idle_priority", False),
        ("DISPATCHER_IDLE_PRIORITY", "1", "dispatcher_idle_priority", True),
        ("DISPATCHER_IDLE_PRIORITY", "AUTO", "dispatcher_idle_priority", None),
        ("DRAIN_RATE_PER_S", "500", "drain_rate_per_s", 500),
        ("FALLBACK_AFTER_S", "2.5", "fallback_after_s", 2.5),
        ("REQUEST_TIMEOUT_S", "0.5", "request_timeout_s", 0.5),
        ("RETRY_BACKOFF_MIN_S", "0.2", "retry_backoff_min_s", 0.2),
        ("RETRY_BACKOFF_MAX_S", "30", "retry_backoff_max_s", 30.0),
        ("HEALTH_POLL", "0", "health_poll", False),
        ("HEALTH_POLL", "false", "health_poll", False),
        ("HEALTH_POLL", "OFF", "health_poll", False),
        ("HEALTH_POLL", "no", "health_poll", False),
        ("HEALTH_POLL", "", "health_poll", False),
        ("HEALTH_POLL", "yes", "health_poll", True),
        ("HEALTH_POLL", "True", "health_poll", True),
        ("HEALTH_POLL", "on", "health_poll", True),
        ("HEALTH_INTERVAL_S", "7.5", "health_interval_s", 7.5),
        ("PEER_ADDR", "api2:9000", "peer_addr", ("api2", 9000)),
        ("PEER_ADDR", "127.0.0.1:9001", "peer_addr", ("127.0.0.1", 9001)),
        ("PEER_ADDR", "", "peer_addr", None),
        ("PEERS", "api2:9000", "peers", (("api2", 9000),)),
        ("PEERS", "api2:9000, api3:9000,10.0.0.4:9001", "peers",
         (("api2", 9000), ("api3", 9000), ("10.0.0.4", 9001))),
        ("PEERS", "", "peers", ()),
        ("SYNC_URL", "redis://10.0.0.5:6379/0", "sync_url", "redis://10.0.0.5:6379/0"),
        ("SYNC_URL", "redis://:secret@cache:6380", "sync_url", "redis://:secret@cache:6380"),
        ("SYNC_URL", "", "sync_url", None),
        ("LEDGER_REGIONS", "2", "ledger_regions", 2),
        ("LEDGER_REGIONS", "256", "ledger_regions", 256),
        ("SYNC_HOST", "127.0.0.1", "sync_host", "127.0.0.1"),
        ("SYNC_PORT", "9100", "sync_port", 9100),
        ("SYNC_RESEND_S", "0.25", "sync_resend_s", 0.25),
        ("SYNC_RECOVER_TIMEOUT_S", "0.1", "sync_recover_timeout_s", 0.1),
        ("SYNC_DROP_RATE", "0.3", "sync_drop_rate", 0.3),
        ("SYNC_DROP_RATE", "1", "sync_drop_rate", 1.0),
        ("RINHA_ADMIN_TOKEN", "s3cret", "admin_token", "s3cret"),
        ("RINHA_ADMIN_TOKEN", "", "admin_token", None),
        ("SYNC_DROP_SEED", "7", "sync_drop_seed", 7),
        ("SYNC_PUSH", "0", "sync_push", False),
        ("HEARTBEAT_TIMEOUT_S", "0", "heartbeat_timeout_s", 0.0),
        ("HEARTBEAT_TIMEOUT_S", "2", "heartbeat_timeout_s", 2.0),
        ("HEARTBEAT_TIMEOUT_S", "30", "heartbeat_timeout_s", 30.0),
        ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("LOG_LEVEL", "WARNING", "log_level", "WARNING"),
    ],
)
def test_every_variable_is_parsed(variable: str, raw: str, field: str, value: object) -> None:
    settings = load({variable: raw})
    assert getattr(settings, field) == value
    # ... and only that field moved.
    others = {k: v for k, v in dataclasses.asdict(settings).items() if k != field}
    defaults = {k: v for k, v in dataclasses.asdict(load({})).items() if k != field}
    assert others == defaults


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("PORT", "0"),
        ("PORT", "65536"),
        ("PORT", "x"),
        ("PORT", ""),
        ("PORT", "80.5"),
        ("WORKERS", "0"),
        ("WORKERS", "65"),
        ("PROCESSOR_DEFAULT_URL", "ftp://x"),
        ("PROCESSOR_DEFAULT_URL", "https://x"),
        ("PROCESSOR_DEFAULT_URL", "x:8080"),
        ("PROCESSOR_DEFAULT_URL", "http://"),
        ("PROCESSOR_DEFAULT_URL", "http://h/path"),
        ("PROCESSOR_DEFAULT_URL", "http://h?q=1"),
        ("PROCESSOR_FALLBACK_URL", "ftp://x"),
        ("PROCESSOR_FALLBACK_URL", "http://h/payments"),
        ("QUEUE_MAX_MESSAGES", "0"),
        ("HOLD_CAPACITY", "15"),
        ("LEDGER_SECONDS", "1000"),  # not a power of two
        ("LEDGER_SECONDS", "1536"),
        ("LEDGER_SECONDS", "512"),  # a power of two, but below 1024
        ("DISPATCH_CONCURRENCY", "0"),
        ("DRAIN_RATE_PER_S", "-1"),
        ("FALLBACK_AFTER_S", "nan"),
        ("FALLBACK_AFTER_S", "inf"),
        ("FALLBACK_AFTER_S", "-1"),
        ("REQUEST_TIMEOUT_S", "0"),
        ("RETRY_BACKOFF_MIN_S", "0"),
        ("RETRY_BACKOFF_MAX_S", "601"),
        ("HEALTH_INTERVAL_S", "1"),  # the contest allows one health call per 5 s
        ("HEALTH_INTERVAL_S", "4.99"),
        ("HEALTH_POLL", "maybe"),
        ("DISPATCHER_IDLE_PRIORITY", "idle"),
        ("DISPATCH_BATCH_S", "-0.01"),
        ("PEER_ADDR", "nohostport"),
        ("PEER_ADDR", ":9000"),
        ("PEER_ADDR", "api2:"),
        ("PEER_ADDR", "api2:0"),
        ("PEER_ADDR", "api2:port"),
        ("PEERS", "api2"),
        ("PEERS", "api2:9000,"),
        ("PEERS", "api2:9000,api2:9000"),
        ("SYNC_URL", "http://cache:6379"),
        ("SYNC_URL", "redis://"),
        ("SYNC_URL", "redis://cache:port"),
        ("SYNC_URL", "redis://cache:6379/zero"),
        ("LEDGER_REGIONS", "1"),
        ("LEDGER_REGIONS", "257"),
        ("SYNC_PORT", "70000"),
        ("SYNC_RESEND_S", "0"),
        ("SYNC_RECOVER_TIMEOUT_S", "0.01"),
        ("SYNC_DROP_RATE", "2"),
        ("SYNC_DROP_RATE", "-0.1"),
        ("INSTANCE_NAME", "a/b"),
        ("INSTANCE_NAME", ""),
        ("INSTANCE_NAME", "a b"),
        ("INSTANCE_NAME", "x" * 41),
        ("HEARTBEAT_TIMEOUT_S", "1.9"),
        ("HEARTBEAT_TIMEOUT_S", "-1"),
        ("HEARTBEAT_TIMEOUT_S", "3601"),
        ("LOG_LEVEL", "bogus"),
        ("LOG_LEVEL", "WARN"),
    ],
)
def test_a_bad_value_raises_naming_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load({variable: raw})
    assert str(caught.value).startswith(f"{variable}=")


@pytest.mark.parametrize("raw", ["http://h:abc", "http://h:99999", "http://h:0"])
def test_a_processor_url_with_a_bad_port_is_refused(raw: str) -> None:
    with pytest.raises(SettingsError, match="^PROCESSOR_DEFAULT_URL="):
        load({"PROCESSOR_DEFAULT_URL": raw})


@pytest.mark.parametrize(("low", "high"), [("0.5", "0.4"), ("2", "1")])
def test_backoff_minimum_above_maximum_is_refused(low: str, high: str) -> None:
    with pytest.raises(SettingsError, match="RETRY_BACKOFF_MIN_S"):
        load({"RETRY_BACKOFF_MIN_S": low, "RETRY_BACKOFF_MAX_S": high})


@pytest.mark.parametrize(
    ("environ", "complaint"),
    [
        ({"PEER_ADDR": "a:1", "PEERS": "b:1"}, "PEER_ADDR and PEERS"),
        ({"SYNC_URL": "redis://r:6379/0", "PEERS": "b:1"}, "SYNC_URL and PEERS"),
        ({"SYNC_URL": "redis://r:6379/0", "PEER_ADDR": "b:1"}, "SYNC_URL and PEERS"),
        ({"PEERS": "a:1,b:1,c:1", "LEDGER_REGIONS": "3"}, "LEDGER_REGIONS=4"),
    ],
)
def test_sync_settings_that_contradict_each_other_are_refused(
    environ: dict[str, str], complaint: str
) -> None:
    with pytest.raises(SettingsError, match=complaint):
        load(environ)


def test_sync_peers_is_peers_or_the_pairs_peer_addr() -> None:
    assert load({}).sync_peers == ()
    assert load({"PEER_ADDR": "api2:9000"}).sync_peers == (("api2", 9000),)
    assert load({"PEERS": "api2:9000,api3:9000"}).sync_peers == (("api2", 9000), ("api3", 9000))
    assert load({"PEERS": "a:1,b:1,c:1", "LEDGER_REGIONS": "4"}).sync_peers[2] == ("c", 1)


def test_backoff_minimum_equal_to_maximum_is_fine() -> None:
    settings = load({"RETRY_BACKOFF_MIN_S": "0.5", "RETRY_BACKOFF_MAX_S": "0.5"})
    assert (settings.retry_backoff_min_s, settings.retry_backoff_max_s) == (0.5, 0.5)


def test_settings_are_frozen() -> None:
    settings = load({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    assert settings.port == 8080


def test_derived_names_contain_the_instance_name() -> None:
    settings = load({"INSTANCE_NAME": "api2"})
    assert settings.queue_name == "/rinha-api2-queue"
    assert settings.ledger_name == "/rinha-api2-ledger"
    assert settings.holding_name == "/rinha-api2-holding"
    assert settings.lock_path == "/dev/shm/rinha-api2.lock"


def test_two_instances_share_no_name() -> None:
    one, two = load({"INSTANCE_NAME": "api1"}), load({"INSTANCE_NAME": "api2"})
    names = ("queue_name", "ledger_name", "holding_name", "lock_path")
    assert not {getattr(one, n) for n in names} & {getattr(two, n) for n in names}


def test_processor_urls_are_indexed_default_then_fallback() -> None:
    settings = load({
        "PROCESSOR_DEFAULT_URL": "http://d:1",
        "PROCESSOR_FALLBACK_URL": "http://f:2",
    })
    assert settings.processor_urls == ("http://d:1", "http://f:2")
