"""The instance's kernel objects: the POSIX queue, the ledger and the holding table.

Created by the supervisor before it forks; the children inherit them. Names derive from
INSTANCE_NAME. A crashed instance leaves them behind: the next supervisor of that name (the
instance lock proves the old one is gone) reopens them, so payments still queued or held are
re-driven and the ledger keeps its counts. On a clean stop with nothing left to send they are
removed.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import posix_ipc

from rinha import wire
from rinha.heartbeat import Heartbeats
from rinha.holding import HoldingTable
from rinha.ledger import Ledger
from rinha.metrics import Metrics
from rinha.settings import Settings

log = logging.getLogger("rinha.resources")

MSG_MAX_PATH = "/proc/sys/fs/mqueue/msg_max"


class StartupError(RuntimeError):
    """The instance cannot start; the message says why and how to fix it."""


@dataclass
class Resources:
    queue: posix_ipc.MessageQueue
    ledger: Ledger
    table: HoldingTable
    heartbeats: Heartbeats
    metrics: Metrics

    @classmethod
    def open_or_create(cls, settings: Settings) -> Resources:
        queue = _open_queue(settings)
        ledger = _open_ledger(settings)
        table = _open_table(settings)
        return cls(queue, ledger, table, Heartbeats.create_or_open(settings.heartbeat_name),
                   Metrics.create_or_open(settings.metrics_name))

    def is_drained(self) -> bool:
        """Nothing waits in the queue and nothing is held: safe to remove everything."""
        return self.queue.current_messages == 0 and next(self.table.held(), None) is None

    def close(self, settings: Settings, remove: bool) -> None:
        self.queue.close()
        self.ledger.close()
        self.table.close()
        self.heartbeats.close()
        Heartbeats.unlink(settings.heartbeat_name)  # nothing in it outlives the supervisor
        self.metrics.close()
        if remove:
            unlink_all(settings)


def unlink_all(settings: Settings) -> None:
    try:
        posix_ipc.unlink_message_queue(settings.queue_name)
    except posix_ipc.ExistentialError:
        pass
    Ledger.unlink(settings.ledger_name)
    HoldingTable.unlink(settings.holding_name)
    Heartbeats.unlink(settings.heartbeat_name)
    Metrics.unlink(settings.metrics_name)


def _open_queue(settings: Settings) -> posix_ipc.MessageQueue:
    try:
        queue = posix_ipc.MessageQueue(
            settings.queue_name, posix_ipc.O_CREAT, mode=0o600,
            max_messages=settings.queue_max_messages,
            max_message_size=wire.PAYMENT_RECORD_SIZE,
        )
    except ValueError:
        raise StartupError(
            f"cannot create the queue with QUEUE_MAX_MESSAGES={settings.queue_max_messages}: "
            f"the kernel allows at most fs.mqueue.msg_max={_read_msg_max()} messages per queue. "
            f"Fix: as root, `sysctl -w fs.mqueue.msg_max={settings.queue_max_messages}`; in "
            "docker compose, `sysctls: {fs.mqueue.msg_max: ...}`; or lower QUEUE_MAX_MESSAGES."
        ) from None
    except OSError as exc:
        # posix_ipc raises EMFILE as an OSError without errno, only the message says it.
        if exc.errno == errno.EMFILE or "maximum number of files" in str(exc):
            raise StartupError(
                f"cannot create the queue with QUEUE_MAX_MESSAGES={settings.queue_max_messages}: "
                "the user's message-queue byte budget (RLIMIT_MSGQUEUE, shared by all queues of "
                "this user) is spent. Fix: lower QUEUE_MAX_MESSAGES, stop other instances, or "
                "raise the limit (docker compose: `ulimits: {msgqueue: BYTES}`)."
            ) from None
        raise
    if (queue.max_messages, queue.max_message_size) != (
        settings.queue_max_messages, wire.PAYMENT_RECORD_SIZE
    ):
        if queue.current_messages:
            log.warning("reusing queue %s as it is (%d messages of %d bytes): it still holds %d "
                        "payments", settings.queue_name, queue.max_messages,
                        queue.max_message_size, queue.current_messages)
        else:
            queue.close()
            queue.unlink()
            return _open_queue(settings)
    elif queue.current_messages:
        log.warning("queue %s holds %d payments from a previous run; they will be sent",
                    settings.queue_name, queue.current_messages)
    return queue


def _read_msg_max() -> str:
    try:
        with open(MSG_MAX_PATH) as f:
            return f.read().strip()
    except OSError:
        return "?"


def _open_ledger(settings: Settings) -> Ledger:
    try:
        return Ledger.create(settings.ledger_name, settings.ledger_seconds,
                             settings.ledger_regions)
    except FileExistsError:
        log.warning("reopening the ledger %s of a previous run", settings.ledger_name)
        return Ledger.open(settings.ledger_name)


def _open_table(settings: Settings) -> HoldingTable:
    try:
        return HoldingTable.create(settings.holding_name, settings.hold_capacity)
    except posix_ipc.ExistentialError:
        table = HoldingTable.open(settings.holding_name)
        log.warning("reopening the holding table %s of a previous run (%d slots)",
                    settings.holding_name, table.capacity)
        return table
