"""Server-side latency of HTTP/1.1 requests, read from a packet capture.

Used by benchmarks/budgets.py: tcpdump records the loopback traffic of the worker's port, and
for every request the latency is the time from its first packet reaching the server's socket
to the first packet of the answer leaving it, both stamped by the kernel. Unlike a client's
figure, it holds no client scheduling, so it is the server's own share of a request.
Requests and answers are matched in order per TCP connection (HTTP/1.1 keep-alive answers in
order). Only what is needed is parsed: pcap (microsecond or nanosecond), Ethernet or Linux
"cooked" or loopback (DLT_NULL) framing, IPv4, TCP.
"""

from __future__ import annotations

import struct
from collections import defaultdict, deque
from pathlib import Path

_MAGIC_US = 0xA1B2C3D4
_MAGIC_NS = 0xA1B23C4D
_LINK_HEADER = {0: 4, 1: 14, 113: 16, 276: 20}  # NULL, Ethernet, Linux SLL, Linux SLL2


def server_latencies_s(path: str | Path, server_port: int) -> list[float]:
    data = Path(path).read_bytes()
    if len(data) < 24:
        return []
    magic = struct.unpack_from("<I", data)[0]
    endian = "<"
    if magic not in (_MAGIC_US, _MAGIC_NS):
        endian = ">"
        magic = struct.unpack_from(">I", data)[0]
    scale = 1e-9 if magic == _MAGIC_NS else 1e-6
    link = struct.unpack_from(endian + "I", data, 20)[0]
    link_len = _LINK_HEADER.get(link)
    if link_len is None:
        raise ValueError(f"unsupported link type {link}")
    record = struct.Struct(endian + "IIII")
    pending: dict[tuple[int, int], deque[float]] = defaultdict(deque)
    latencies = []
    offset = 24
    while offset + 16 <= len(data):
        seconds, fraction, captured, _ = record.unpack_from(data, offset)
        offset += 16
        packet = data[offset:offset + captured]
        offset += captured
        ip = packet[link_len:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        ip_len = (ip[0] & 0x0F) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        tcp = ip[ip_len:total]
        if len(tcp) < 20:
            continue
        source, destination = struct.unpack_from("!HH", tcp)
        payload = tcp[(tcp[12] >> 4) * 4:]
        if not payload:
            continue
        stamp = seconds + fraction * scale
        if destination == server_port and payload[:1].isalpha() and not payload.startswith(
            b"HTTP/"
        ):
            pending[(source, destination)].append(stamp)  # a request's first segment
        elif source == server_port and payload.startswith(b"HTTP/"):
            queue = pending.get((destination, source))
            if queue:
                latencies.append(stamp - queue.popleft())
    return latencies
