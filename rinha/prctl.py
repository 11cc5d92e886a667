"""Linux process attributes set with prctl(2): a child's name, and dying with its parent.

Used by the supervisor's children (after fork) and by `rinha stack`'s children (before exec).
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15

_libc = ctypes.CDLL(None, use_errno=True)


def set_process_name(name: str) -> None:
    """Name this process in `ps -o comm` and /proc/PID/comm (15 bytes at most), so operators
    and tests can tell the dispatcher from a worker: all children share one command line."""
    _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def die_with_parent(parent_pid: int, signo: int = signal.SIGKILL) -> None:
    """Have the kernel send `signo` to this process when its parent dies, so a parent killed
    with SIGKILL orphans nothing. `parent_pid` is the parent as the caller knew it before
    fork: if it already died in between, the request would never fire, so go now."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signo, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signo)
