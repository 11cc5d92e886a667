"""The shared-memory ledger of processed payments, per second and per processor.

Imported by every rinha process: the supervisor creates the segment, dispatchers add this
instance's payments to region OWN, the peer sync stores the other instance's totals in
region PEER, intake workers sum both for GET /payments-summary. The work is done lock-free
in the C extension `native_ledger._ledger`; its header comment gives the layout and why each
atomic is ordered as it is. Each region is a ring of N seconds (default 2**17, about 36.4 h):
a second is overwritten when its slot is reused N seconds later.

Beside it, `native_ledger._mqueue.receive_into` lets the dispatcher have the kernel copy a
queue record straight into its holding-table slot (rinha/holding.py, "staging").
"""

from native_ledger._ledger import (
    CENTS_BITS,
    COUNT_BITS,
    DEFAULT,
    DEFAULT_SECONDS,
    FALLBACK,
    LAYOUT_VERSION,
    MAX_CENTS,
    MAX_COUNT,
    MAX_SECONDS,
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
    "DEFAULT_SECONDS",
    "FALLBACK",
    "LAYOUT_VERSION",
    "MAX_CENTS",
    "MAX_COUNT",
    "MAX_SECONDS",
    "MIN_SECONDS",
    "OWN",
    "PEER",
    "Ledger",
    "pack",
    "unlink",
    "unpack",
]
