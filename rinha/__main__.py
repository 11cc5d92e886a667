"""`rinha`: the command line. `serve` reads as the startup sequence of an instance.

  rinha serve                          one instance: supervisor, workers, dispatcher
  rinha processor --port P --fee F     a payment-processor emulator
  rinha stack                          the whole contest topology as local processes
  rinha status [URL ...]               the /status of each instance, side by side

`rinha COMMAND --help` tells what each one takes (for serve: the environment variables).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import socket
import sys

from rinha import logs
from rinha import settings as settings_module
from rinha.guards import InstanceLock, ensure_port_free
from rinha.metrics import DispatcherCounters, SupervisorCounters
from rinha.peers import bind_sync_socket
from rinha.resources import Resources, StartupError
from rinha.settings import Settings, SettingsError
from rinha.supervisor import BootError, ChildSpec, Supervisor

USAGE = __doc__


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        return serve(rest)
    if command == "status":
        from rinha import status_cli

        return status_cli.main(rest)
    if command in ("processor", "stack"):
        try:
            from rinha_lab import emulator, stack
        except ImportError:
            print(f"rinha {command} is part of the local lab (rinha_lab), which is not installed "
                  "here (a container has only the serving path): run it from a clone of the "
                  "repository set up with scripts/setup.sh", file=sys.stderr)
            return 2
        return (emulator if command == "processor" else stack).main(rest)
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rinha serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one instance: a supervisor, WORKERS socketify workers answering\n"
                    "POST /payments and GET /payments-summary on PORT, and one dispatcher\n"
                    "sending payments to the processors. Configured by the environment only.",
        epilog="environment variables:\n" + settings_module.describe(),
    )
    parser.parse_args(argv)  # --help prints the above and exits; anything else is refused
    try:
        settings = settings_module.load()
    except SettingsError as exc:
        print(f"rinha serve: {exc}", file=sys.stderr)
        return 2
    if settings.sync_url is not None and importlib.util.find_spec("redis") is None:
        print("rinha serve: SYNC_URL needs redis-py: install rinha with the redis extra "
              "(pip install 'rinha[redis]')", file=sys.stderr)
        return 2
    _configure_logging(settings)
    log = logging.getLogger("rinha")
    lock = InstanceLock(settings.lock_path)
    try:
        lock.acquire()
        ensure_port_free(settings.host, settings.port)
        sync_socket = None
        if settings.sync_peers:
            ensure_port_free(settings.sync_host, settings.sync_port, socket.SOCK_DGRAM)
            sync_socket = bind_sync_socket(settings)
        resources = Resources.open_or_create(settings)
    except StartupError as exc:
        log.error("%s", exc)
        lock.release()
        return 1
    # Before any worker answers a summary: get back what this instance had recorded (the others
    # kept a mirror of it) and what the others hold, in case this is a restart with fresh
    # shared memory.
    if sync_socket is not None:
        _recover_from_peers(settings, resources, sync_socket)
    elif settings.sync_url is not None:
        _recover_from_redis(settings, resources)
    children = [
        ChildSpec(f"worker{i}", lambda slot=i: run_worker(settings, resources, slot), slot=i)
        for i in range(settings.workers)
    ]
    dispatcher_slot = settings.workers
    children.append(ChildSpec(
        "dispatch", lambda: run_dispatcher(settings, resources, sync_socket, dispatcher_slot),
        slot=dispatcher_slot,
    ))
    log.info("instance %s: %d workers on %s:%d, processors %s and %s", settings.instance_name,
             settings.workers, settings.host, settings.port, *settings.processor_urls)
    try:
        code = Supervisor(children, resources.heartbeats, settings.heartbeat_timeout_s,
                          SupervisorCounters(resources.metrics)).run()
    finally:
        drained = resources.is_drained()
        if not drained:
            log.warning("payments are still queued or held; kept for the next start of "
                        "instance %s", settings.instance_name)
        resources.close(settings, remove=drained)
        lock.release()
    return code


def _recover_from_peers(settings: Settings, resources: Resources,
                        sync_socket: socket.socket) -> None:
    from rinha.peer_recovery import recover_from_peers

    log = logging.getLogger("rinha")
    answered = recover_from_peers(settings, resources.ledger, sync_socket)
    peers = len(settings.sync_peers)
    if answered:
        log.info("recovered the ledger from %d of %d peers", answered, peers)
    else:
        log.info("no peer answered (%d configured); starting with the local ledger", peers)


def _recover_from_redis(settings: Settings, resources: Resources) -> None:
    from rinha.redis_store import recover_from_redis

    log = logging.getLogger("rinha")
    mirrored = recover_from_redis(settings, resources.ledger)
    if mirrored is None:
        log.warning("Redis at %s did not answer; starting with the local ledger (the "
                    "dispatcher recovers from Redis once it answers)", settings.sync_url)
    else:
        log.info("recovered the ledger from Redis: own cells and %d other instances", mirrored)


def run_worker(settings: Settings, resources: Resources, slot: int) -> None:
    from rinha.intake import Intake

    try:
        Intake(settings, resources, slot).serve()
    except OSError as exc:
        raise BootError(str(exc)) from exc


def run_dispatcher(
    settings: Settings, resources: Resources, sync_socket: socket.socket | None, slot: int
) -> None:
    from rinha.cpu_quota import under_cpu_quota
    from rinha.dispatcher import Dispatcher
    from rinha.pacing import paced_event_loop, yield_cpu_to_workers

    dispatcher = Dispatcher(settings, resources.queue, resources.table, resources.ledger,
                            sync_socket, heartbeat=lambda: resources.heartbeats.beat(slot),
                            counters=DispatcherCounters(resources.metrics))
    idle = settings.dispatcher_idle_priority
    if idle is None:
        idle = under_cpu_quota()
    if idle:
        yield_cpu_to_workers()
    try:
        loop_factory = lambda: paced_event_loop(settings.dispatch_batch_s)  # noqa: E731
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(dispatcher.run())
    except RuntimeError as exc:
        if "Event loop stopped" not in str(exc):
            raise
    if dispatcher.crashed:
        raise SystemExit("the dispatcher stopped on an unexpected error")


def _configure_logging(settings: Settings) -> None:
    logs.configure(settings.instance_name, settings.log_level, settings.log_format)


if __name__ == "__main__":
    raise SystemExit(main())
