"""The shared-memory ledger of processed payments, per second and per processor.

Imported by every rinha process: the supervisor creates the segment, the dispatcher adds this
instance's payments to region OWN (0), the sync (UDP peers or Redis) stores each other
instance's totals in a region of its own (labelled with that instance's name, given out as the
sync first hears of it; PEER, 1, is the first of them, the peer of a pair), intake workers sum
every region in use for GET /payments-summary. The work is done lock-free
in the C extension `native_ledger._ledger`; its header comment gives the layout and why each
atomic is ordered as it is. Each region is a ring of N seconds (default 2**17, about 36.4 h):
a second is overwritten when its slot is reused N seconds later. A segment holds R regions
(default 16, the most instances of a deployment); only the regions in use are reserved in
memory and read.

Beside it, `native_ledger._mqueue.receive_into` lets the dispatcher have the kernel copy a
queue record straight into its holding-table slot (rinha/holding.py, "staging").
"""

from native_ledger._ledger import (
    CENTS_BITS,
    COUNT_BITS,
    DEFAULT,
    DEFAULT_REGIONS,
    DEFAULT_SECONDS,
    FALLBACK,
    LABEL_BYTES,
    LAYOUT_VERSION,
    MAX_CENTS,
    MAX_COUNT,
    MAX_REGIONS,
    MAX_SECONDS,
    MIN_REGIONS,
    MIN_SECONDS,
    OWN,
    PEER,
    Ledger,
    pack,
    unlink,
    unpack,
)

__all__ = [
    "CENTS_BITS",
    "COUNT_BITS",
    "DEFAULT",
    "DEFAULT_REGIONS",
    "DEFAULT_SECONDS",
    "FALLBACK",
    "LABEL_BYTES",
    "LAYOUT_VERSION",
    "MAX_CENTS",
    "MAX_COUNT",
    "MAX_REGIONS",
    "MAX_SECONDS",
    "MIN_REGIONS",
    "MIN_SECONDS",
    "OWN",
    "PEER",
    "Ledger",
    "pack",
    "unlink",
    "unpack",
]
