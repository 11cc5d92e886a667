"""Peer sync: each instance keeps a mirror of the other's ledger, over UDP.

The UDP socket is bound by the supervisor (so a restarted dispatcher keeps it) and served from
the dispatcher's loop. What travels (formats in wire.py, all absolute values, docs/architecture.md,
invariant 6):
  - the OWN cells recorded in a loop turn, at once, coalesced into one datagram;
  - every SYNC_RESEND_S, the OWN cells of the last RESEND_WINDOW_S seconds, which heals losses;
    an instance that recorded nothing for that long sends nothing;
  - PURGE, resent until acknowledged, because a purge through nginx reaches one instance only;
  - HEALTH, from the one instance that polls the processors (invariant 5);
  - on start, RECOVER_REQUEST: the peer answers with its mirror of our cells (RECOVERY) and its
    own cells (CELLS), so a restarted instance gets back what it had recorded before it
    answers a summary (see `recover_from_peer`, run by the supervisor before forking).
Received cells merge by keeping the larger count: counts only grow between purges, so a stale
or reordered datagram can never lower a value. Datagrams from any address but the configured
peer, or malformed ones, are dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable

from rinha import metrics, wire
from rinha.health import HealthReport
from rinha.ledger import OWN, PEER, PROCESSORS, Ledger
from rinha.metrics import DispatcherCounters
from rinha.settings import Settings

log = logging.getLogger("rinha.peers")

RESEND_WINDOW_S = 60
PURGE_RESEND_S = 0.1
PURGE_GIVE_UP_S = 10.0
RESOLVE_EVERY_S = 1.0
RECOVERY_ATTEMPTS = 3


class PeerAddress:
    """The configured peer, resolved by name (a restarted container may come back on another
    IP, so an unknown sender triggers a fresh resolution, at most once a second)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._ips: set[str] = set()
        self._resolved_at = 0.0

    def target(self) -> tuple[str, int] | None:
        if not self._ips:
            self.resolve()
        return (next(iter(self._ips)), self.port) if self._ips else None

    def is_peer(self, address: tuple[str, int]) -> bool:
        if address[1] != self.port:
            return False
        if address[0] in self._ips:
            return True
        return self.resolve() and address[0] in self._ips

    def resolve(self) -> bool:
        now = time.monotonic()
        if now - self._resolved_at < RESOLVE_EVERY_S:
            return False
        self._resolved_at = now
        try:
            infos = socket.getaddrinfo(self.host, self.port, socket.AF_INET, socket.SOCK_DGRAM)
        except socket.gaierror:
            return False
        self._ips = {info[4][0] for info in infos}
        return True


def bind_sync_socket(settings: Settings) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((settings.sync_host, settings.sync_port))
    return sock


def own_cells(ledger: Ledger, region: int, first: int | None = None) -> list[wire.Cell]:
    """Every non-empty cell of `region` from second `first` on (all written seconds if None)."""
    span = ledger.seconds_written(region)
    if span is None:
        return []
    low, high = span
    low = max(low, high - ledger.seconds + 1, first if first is not None else low)
    cells = []
    for second in range(low, high + 1):
        for processor in PROCESSORS:
            count, cents = ledger.cell(region, second, processor)
            if count:
                cells.append((second, processor, count, cents))
    return cells


def merge_cells(ledger: Ledger, region: int, cells: list[wire.Cell]) -> None:
    """Keep the larger count of each cell: a stale datagram never lowers a value."""
    for second, processor, count, cents in cells:
        if count > ledger.cell(region, second, processor)[0]:
            ledger.store(region, second, processor, count, cents)


class PeerSync:
    """The dispatcher's side of peer sync: it hears of every OWN cell recorded and of purges."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        sock: socket.socket,
        on_health: Callable[[HealthReport], None],
        counters: DispatcherCounters | None = None,
    ) -> None:
        self._counters = counters
        assert settings.peer_addr is not None
        self._settings = settings
        self._ledger = ledger
        self._sock = sock
        self._on_health = on_health
        self._peer = PeerAddress(*settings.peer_addr)
        self._drops = random.Random(settings.sync_drop_seed)  # the test-only fault's dice
        self._last_record = 0.0
        self._pending_purges: dict[int, float] = {}  # nonce -> first sent (monotonic)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dropped_foreign = 0
        self.dropped_malformed = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._sock.setblocking(False)
        loop.add_reader(self._sock.fileno(), self._on_readable)
        loop.call_later(self._settings.sync_resend_s, self._resend_recent)

    # Told by the dispatcher ------------------------------------------------------------------

    def recorded(self, cells: set[tuple[int, int]]) -> None:
        self._last_record = time.monotonic()
        if not self._settings.sync_push:
            return  # the periodic resend carries them
        values = [(s, p, *self._ledger.own_cell(s, p)) for s, p in sorted(cells)]
        for datagram in wire.encode_cells(wire.CELLS, values):
            self._send(datagram)

    def purged(self) -> None:
        nonce = secrets.randbits(32)
        self._pending_purges[nonce] = time.monotonic()
        self._resend_purges()

    def share_health(self, report: HealthReport) -> None:
        self._send(wire.encode_health(report.processor, report.failing, report.min_response_ms))

    # Sending --------------------------------------------------------------------------------

    def _send(self, datagram: bytes) -> None:
        if self._settings.sync_drop_rate and self._drops.random() < self._settings.sync_drop_rate:
            return  # the test-only fault switch: lose this datagram on purpose
        target = self._peer.target()
        if target is None:
            return
        try:
            self._sock.sendto(datagram, target)
            if self._counters is not None:
                self._counters.sync(metrics.SYNC_SENT)
        except OSError as exc:
            # The peer is down or the buffer is full: the periodic resend heals it.
            log.debug("sync datagram not sent: %r", exc)

    def _resend_recent(self) -> None:
        assert self._loop is not None
        self._loop.call_later(self._settings.sync_resend_s, self._resend_recent)
        if time.monotonic() - self._last_record > RESEND_WINDOW_S:
            return
        first = int(time.time()) - RESEND_WINDOW_S
        for datagram in wire.encode_cells(wire.CELLS, own_cells(self._ledger, OWN, first)):
            self._send(datagram)

    def _resend_purges(self) -> None:
        now = time.monotonic()
        for nonce, since in list(self._pending_purges.items()):
            if now - since > PURGE_GIVE_UP_S:
                log.error("the peer never acknowledged purge %08x", nonce)
                del self._pending_purges[nonce]
            else:
                self._send(wire.encode_datagram(wire.PURGE, nonce))
        if self._pending_purges and self._loop is not None:
            self._loop.call_later(PURGE_RESEND_S, self._resend_purges)

    # Receiving ------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        while True:
            try:
                data, address = self._sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("sync receive: %r", exc)  # e.g. ICMP port unreachable from a down peer
                return
            if not self._peer.is_peer(address):
                self.dropped_foreign += 1
                if self._counters is not None:
                    self._counters.sync(metrics.SYNC_FOREIGN)
                log.warning("dropped a sync datagram from %s:%d (not the peer; %d so far)",
                            *address, self.dropped_foreign)
                continue
            try:
                self.handle(data, address)
                if self._counters is not None:
                    self._counters.sync(metrics.SYNC_RECEIVED)
                    self._counters.heard_peer()
            except wire.MalformedDatagram as exc:
                self.dropped_malformed += 1
                if self._counters is not None:
                    self._counters.sync(metrics.SYNC_MALFORMED)
                log.warning("dropped a malformed sync datagram (%s; %d so far)", exc,
                            self.dropped_malformed)

    def handle(self, data: bytes, address: tuple[str, int]) -> None:
        kind, nonce, payload = wire.decode_datagram(data)
        if kind == wire.CELLS:
            merge_cells(self._ledger, PEER, wire.decode_cells(payload))
        elif kind == wire.PURGE:
            if payload:
                raise wire.MalformedDatagram("purge with a payload")
            self._ledger.purge()
            self._reply(wire.encode_datagram(wire.PURGE_ACK, nonce), address)
        elif kind == wire.PURGE_ACK:
            self._pending_purges.pop(nonce, None)
        elif kind == wire.RECOVER_REQUEST:
            self._answer_recovery(nonce, address)
        elif kind == wire.HEALTH:
            self._on_health(HealthReport(*wire.decode_health(payload)))
        # RECOVERY and RECOVERY_DONE only matter to a supervisor that is recovering.

    def _answer_recovery(self, nonce: int, address: tuple[str, int]) -> None:
        datagrams = wire.encode_cells(wire.RECOVERY, own_cells(self._ledger, PEER), nonce)
        datagrams += wire.encode_cells(wire.CELLS, own_cells(self._ledger, OWN), nonce)
        for datagram in datagrams:
            self._reply(datagram, address)
        self._reply(wire.encode_recovery_done(nonce, len(datagrams)), address)
        log.info("sent the peer its %d-datagram recovery", len(datagrams))

    def _reply(self, datagram: bytes, address: tuple[str, int]) -> None:
        if self._settings.sync_drop_rate and self._drops.random() < self._settings.sync_drop_rate:
            return
        try:
            self._sock.sendto(datagram, address)
        except OSError as exc:
            log.debug("sync reply not sent: %r", exc)


def recover_from_peer(settings: Settings, ledger: Ledger, sock: socket.socket) -> bool:
    """Before the children start: ask the peer for our own cells (its mirror of us) and for
    its cells, and merge both. Returns False if the peer did not answer in time (it may not
    be up yet: then there is nothing to recover either)."""
    assert settings.peer_addr is not None
    peer = PeerAddress(*settings.peer_addr)
    deadline = time.monotonic() + settings.sync_recover_timeout_s
    for _ in range(RECOVERY_ATTEMPTS):
        nonce = secrets.randbits(32)
        target = peer.target()
        if target is None:
            return False
        try:
            sock.sendto(wire.encode_datagram(wire.RECOVER_REQUEST, nonce), target)
        except OSError:
            return False
        received, expected = 0, None
        while expected is None or received < expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            sock.settimeout(min(remaining, settings.sync_recover_timeout_s / RECOVERY_ATTEMPTS))
            try:
                data, address = sock.recvfrom(2048)
            except TimeoutError:
                break  # ask again
            except OSError:
                return False  # e.g. connection refused: nobody listens there yet
            if not peer.is_peer(address):
                continue
            try:
                kind, got_nonce, payload = wire.decode_datagram(data)
                if got_nonce != nonce:
                    continue
                if kind == wire.RECOVERY:
                    merge_cells(ledger, OWN, wire.decode_cells(payload))
                    received += 1
                elif kind == wire.CELLS:
                    merge_cells(ledger, PEER, wire.decode_cells(payload))
                    received += 1
                elif kind == wire.RECOVERY_DONE:
                    expected = wire.decode_recovery_done(payload)
            except wire.MalformedDatagram:
                continue
        else:
            sock.settimeout(None)
            return True
    sock.settimeout(None)
    return False
