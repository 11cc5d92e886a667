"""Peer sync over UDP: each instance mirrors every other instance's ledger region.

For instances on one host or one network (the contest's pair, `rinha stack --instances N`);
across hosts, redis_sync.py carries the same messages through Redis. The UDP socket is bound
by the supervisor (so a restarted dispatcher keeps it) and served from the dispatcher's loop.
Every instance is the only writer of its own region (OWN) and sends it to each configured peer
(PEERS, or the pair's PEER_ADDR); what travels (formats in wire.py, every datagram naming its
sender, all values absolute, docs/architecture.md, invariant 6):
  - the OWN cells recorded in a loop turn, at once, coalesced into one datagram per peer;
  - every SYNC_RESEND_S, the OWN cells of the last RESEND_WINDOW_S seconds, which heals losses;
    an instance that recorded nothing for that long sends nothing;
  - PURGE, resent to each peer until that peer acknowledges, because a purge through nginx
    reaches one instance only. A purge is known by its nonce: a copy heard again (a resend
    whose acknowledgement was lost, or the same purge passed on by another peer) is only
    acknowledged, never carried out twice; an instance that hears of a purge passes it on to
    its other peers. Until a peer acknowledges a purge this instance sent it, that peer's cells
    are dropped: they may have left before it purged (the periodic resend brings its later
    ones);
  - HEALTH, from the one instance that polls the processors (invariant 5), to every peer;
  - on start, RECOVER_REQUEST to every peer: each answers with every region it holds (its own
    and its mirrors, this instance's among them), so a restarted instance gets back what it
    had recorded, and what the others had, before it answers a summary (peer_recovery.py).
A received instance's cells go to the region labelled with its name (mirror.py) and merge by
keeping the larger count. Datagrams from any address but a configured peer's, claiming to come
from this instance, or malformed, are dropped and counted.
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
from rinha.ledger import OWN, Ledger
from rinha.metrics import DispatcherCounters
from rinha.mirror import every_region, merge_cells, region_cells, region_of
from rinha.settings import Settings

log = logging.getLogger("rinha.peers")

RESEND_WINDOW_S = 60
PURGE_RESEND_S = 0.1
PURGE_GIVE_UP_S = 10.0
RESOLVE_EVERY_S = 1.0

# The names the sync's tests and the recovery import from here.
own_cells = region_cells
__all__ = ["PeerAddress", "PeerSync", "bind_sync_socket", "merge_cells", "own_cells"]


class PeerAddress:
    """One configured peer, resolved by name (a restarted container may come back on another
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


def peer_addresses(settings: Settings) -> list[PeerAddress]:
    return [PeerAddress(host, port) for host, port in settings.sync_peers]


def which_peer(peers: list[PeerAddress], address: tuple[str, int]) -> int | None:
    """The index of the configured peer `address` is, None for a stranger."""
    for index, peer in enumerate(peers):
        if peer.is_peer(address):
            return index
    return None


def bind_sync_socket(settings: Settings) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((settings.sync_host, settings.sync_port))
    return sock


class PeerSync:
    """The dispatcher's side of UDP sync: it hears of every OWN cell recorded and of purges."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        sock: socket.socket,
        on_health: Callable[[HealthReport], None],
        counters: DispatcherCounters | None = None,
    ) -> None:
        assert settings.sync_peers
        self._counters = counters
        self._settings = settings
        self._name = settings.instance_name
        self._ledger = ledger
        self._sock = sock
        self._on_health = on_health
        self._peers = peer_addresses(settings)
        self._drops = random.Random(settings.sync_drop_seed)  # the test-only fault's dice
        self._last_record = 0.0
        # nonce -> (first sent, monotonic; indices of the peers yet to acknowledge)
        self._pending_purges: dict[int, tuple[float, set[int]]] = {}
        # nonce -> when this instance carried that purge out (monotonic): kept for as long as
        # a peer may resend it, so that a resend is not carried out again
        self._purges_done: dict[int, float] = {}
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
        self._send_cells(values)

    def purged(self) -> None:
        """A worker of this instance purged the ledger (POST /purge-payments)."""
        nonce = secrets.randbits(32)
        self._purges_done[nonce] = time.monotonic()
        self._pass_purge_on(nonce, set(range(len(self._peers))))

    def _pass_purge_on(self, nonce: int, peers: set[int]) -> None:
        if peers:
            self._pending_purges[nonce] = (time.monotonic(), peers)
            self._resend_purges()

    def share_health(self, report: HealthReport) -> None:
        self._send(wire.encode_health(self._name, report.processor, report.failing,
                                      report.min_response_ms))

    # Sending --------------------------------------------------------------------------------

    def _send_cells(self, cells: list[wire.Cell]) -> None:
        for datagram in wire.encode_cells(wire.CELLS, self._name, self._name, cells):
            self._send(datagram)

    def _send(self, datagram: bytes, only: set[int] | None = None) -> None:
        """To every peer (or the peers in `only`)."""
        for index, peer in enumerate(self._peers):
            if only is None or index in only:
                target = peer.target()
                if target is not None:
                    self._send_to(datagram, target)

    def _send_to(self, datagram: bytes, target: tuple[str, int]) -> None:
        if self._settings.sync_drop_rate and self._drops.random() < self._settings.sync_drop_rate:
            return  # the test-only fault switch: lose this datagram on purpose
        try:
            self._sock.sendto(datagram, target)
            if self._counters is not None:
                self._counters.sync(metrics.SYNC_SENT)
        except OSError as exc:
            # That peer is down or the buffer is full: the periodic resend heals it.
            log.debug("sync datagram not sent: %r", exc)

    def _resend_recent(self) -> None:
        assert self._loop is not None
        self._loop.call_later(self._settings.sync_resend_s, self._resend_recent)
        if time.monotonic() - self._last_record > RESEND_WINDOW_S:
            return
        self._send_cells(region_cells(self._ledger, OWN, int(time.time()) - RESEND_WINDOW_S))

    def _resend_purges(self) -> None:
        now = time.monotonic()
        for nonce, (since, waiting) in list(self._pending_purges.items()):
            if now - since > PURGE_GIVE_UP_S:
                missing = ", ".join(f"{self._peers[i].host}:{self._peers[i].port}"
                                    for i in sorted(waiting))
                log.error("purge %08x never acknowledged by %s", nonce, missing)
                del self._pending_purges[nonce]
            else:
                self._send(wire.encode_datagram(wire.PURGE, self._name, nonce), only=waiting)
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
            if which_peer(self._peers, address) is None:
                self.dropped_foreign += 1
                if self._counters is not None:
                    self._counters.sync(metrics.SYNC_FOREIGN)
                log.warning("dropped a sync datagram from %s:%d (not a peer; %d so far)",
                            *address, self.dropped_foreign)
                continue
            try:
                region = self.handle(data, address)
                if self._counters is not None:
                    self._counters.sync(metrics.SYNC_RECEIVED)
                    self._counters.heard_peer(region)
            except wire.MalformedDatagram as exc:
                self.dropped_malformed += 1
                if self._counters is not None:
                    self._counters.sync(metrics.SYNC_MALFORMED)
                log.warning("dropped a malformed sync datagram (%s; %d so far)", exc,
                            self.dropped_malformed)

    def handle(self, data: bytes, address: tuple[str, int]) -> int | None:
        """Act on one datagram from a configured peer; returns the sender's region."""
        kind, nonce, origin, payload = wire.decode_datagram(data)
        if origin == self._name:
            raise wire.MalformedDatagram(f"it names this instance ({origin}) as its sender: "
                                         "two instances share an INSTANCE_NAME?")
        region = region_of(self._ledger, self._name, origin)
        if kind == wire.CELLS:
            subject, cells = wire.decode_cells(payload)
            if subject != origin:
                raise wire.MalformedDatagram(f"{origin} sent cells of {subject} outside a "
                                             "recovery (each instance sends only its own)")
            if region is not None and not self._purge_unacknowledged_by(address):
                merge_cells(self._ledger, region, cells)
        elif kind == wire.PURGE:
            if payload:
                raise wire.MalformedDatagram("purge with a payload")
            if self._first_time(nonce):
                self._ledger.purge()
                # The sender told its own peers; the others of ours may not be among them.
                sender = which_peer(self._peers, address)
                self._pass_purge_on(nonce, set(range(len(self._peers))) - {sender})
            self._reply(wire.encode_datagram(wire.PURGE_ACK, self._name, nonce), address)
        elif kind == wire.PURGE_ACK:
            pending = self._pending_purges.get(nonce)
            index = which_peer(self._peers, address)
            if pending is not None and index is not None:
                pending[1].discard(index)
                if not pending[1]:
                    del self._pending_purges[nonce]
        elif kind == wire.RECOVER_REQUEST:
            self._answer_recovery(nonce, address)
        elif kind == wire.HEALTH:
            self._on_health(HealthReport(*wire.decode_health(payload)))
        # RECOVERY and RECOVERY_DONE only matter to a supervisor that is recovering.
        return region

    def _first_time(self, nonce: int) -> bool:
        """Whether the purge `nonce` is new here (and remember it if so)."""
        now = time.monotonic()
        for done, at in list(self._purges_done.items()):
            if now - at > 2 * PURGE_GIVE_UP_S:
                del self._purges_done[done]
        if nonce in self._purges_done:
            return False
        self._purges_done[nonce] = now
        return True

    def _purge_unacknowledged_by(self, address: tuple[str, int]) -> bool:
        """Whether a purge this instance sent still awaits this peer's acknowledgement: its
        cells may be older than the purge then (it acknowledges only once it has purged)."""
        if not self._pending_purges:
            return False
        index = which_peer(self._peers, address)
        return any(index in waiting for _, waiting in self._pending_purges.values())

    def _answer_recovery(self, nonce: int, address: tuple[str, int]) -> None:
        """Every region this instance holds, each under its instance's name: the requester
        takes its own back and mirrors the rest, even of instances that are down now."""
        datagrams = []
        for subject, region in every_region(self._ledger, self._name):
            datagrams += wire.encode_cells(wire.RECOVERY, self._name, subject,
                                           region_cells(self._ledger, region), nonce)
        for datagram in datagrams:
            self._reply(datagram, address)
        self._reply(wire.encode_recovery_done(self._name, nonce, len(datagrams)), address)
        log.info("sent %s:%d its %d-datagram recovery", *address, len(datagrams))

    def _reply(self, datagram: bytes, address: tuple[str, int]) -> None:
        self._send_to(datagram, address)
