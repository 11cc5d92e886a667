"""Recovery over UDP: a starting instance asks every peer for what it holds, before it answers.

Runs in the supervisor, before it forks (rinha/__main__.py), on the sync socket it will hand to
the dispatcher. Each peer answers a RECOVER_REQUEST with every region it holds (peers.py,
`_answer_recovery`): this instance's own cells as that peer mirrored them, its own, and its
mirrors of the others. All of it merges by keeping the larger count (mirror.py), so answers may
overlap, repeat or arrive out of order; a peer that is down simply does not answer, and what it
alone held comes back with its own next start (invariant 6). Answers from anyone but a
configured peer, or to another request (nonce), are ignored.
"""

from __future__ import annotations

import secrets
import socket
import time

from rinha import wire
from rinha.ledger import Ledger
from rinha.mirror import merge_subject
from rinha.peers import peer_addresses, which_peer
from rinha.settings import Settings

RECOVERY_ATTEMPTS = 3


def recover_from_peers(settings: Settings, ledger: Ledger, sock: socket.socket) -> int:
    """Ask every peer for its regions and merge them; returns how many peers answered in full
    within SYNC_RECOVER_TIMEOUT_S (0: none was up, or none had anything to say in time)."""
    peers = peer_addresses(settings)
    name = settings.instance_name
    deadline = time.monotonic() + settings.sync_recover_timeout_s
    slice_s = settings.sync_recover_timeout_s / RECOVERY_ATTEMPTS
    nonce = secrets.randbits(32)
    received = [0] * len(peers)
    expected: list[int | None] = [None] * len(peers)
    done: set[int] = set()
    try:
        for _ in range(RECOVERY_ATTEMPTS):
            # A fresh nonce per attempt: late answers to an earlier one are not mixed in.
            nonce = secrets.randbits(32)
            received = [0] * len(peers)
            expected = [None] * len(peers)
            for index, peer in enumerate(peers):
                target = peer.target()
                if index in done or target is None:
                    continue
                try:
                    sock.sendto(wire.encode_datagram(wire.RECOVER_REQUEST, name, nonce), target)
                except OSError:
                    continue  # e.g. that peer's address does not resolve to anything up
            attempt_ends = min(deadline, time.monotonic() + slice_s)
            while len(done) < len(peers):
                remaining = attempt_ends - time.monotonic()
                if remaining <= 0:
                    break  # ask the silent ones again
                sock.settimeout(remaining)
                try:
                    data, address = sock.recvfrom(2048)
                except TimeoutError:
                    break
                except OSError:
                    continue  # e.g. an ICMP refusal from a peer that is not up
                index = which_peer(peers, address)
                if index is None or index in done:
                    continue
                try:
                    kind, got_nonce, _origin, payload = wire.decode_datagram(data)
                    if got_nonce != nonce:
                        continue
                    if kind == wire.RECOVERY:
                        merge_subject(ledger, name, *wire.decode_cells(payload))
                        received[index] += 1
                    elif kind == wire.RECOVERY_DONE:
                        expected[index] = wire.decode_recovery_done(payload)
                except wire.MalformedDatagram:
                    continue
                if expected[index] is not None and received[index] >= expected[index]:
                    done.add(index)
            if len(done) == len(peers) or time.monotonic() >= deadline:
                break
    finally:
        sock.settimeout(None)
    return len(done)
