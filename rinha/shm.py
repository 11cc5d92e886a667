"""POSIX shared-memory segments: mapping one, and removing it by name.

Used by the supervisor's resources (the holding table, the heartbeats, the metrics) in every
process that maps them. The ledger is mapped in C (native_ledger).
"""

from __future__ import annotations

import mmap

import posix_ipc


def map_segment(name: str, flags: int = 0, size: int = 0) -> mmap.mmap:
    """Map the segment `name` whole: `flags` posix_ipc.O_CREX / O_CREAT create it of `size`
    bytes; 0 opens an existing one at its own size. The descriptor is closed: the mapping
    alone keeps the memory."""
    memory = posix_ipc.SharedMemory(name, flags, size=size) if flags else \
        posix_ipc.SharedMemory(name)
    try:
        return mmap.mmap(memory.fd, size or memory.size)
    finally:
        memory.close_fd()


def unlink(name: str) -> bool:
    """Remove the segment's name (processes that mapped it keep their mapping); False if there
    was none."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True
