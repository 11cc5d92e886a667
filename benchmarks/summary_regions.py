"""How the summary's read time grows with the instances of a deployment (docs/scaling.md).

  python benchmarks/summary_regions.py [--seconds-written 3600] [--max-instances 16]
                                       [--repeat 2000]

Makes a ledger segment as an instance makes it (LEDGER_SECONDS 131072, LEDGER_REGIONS 16),
writes --seconds-written seconds of cells (both processors) into each of N regions, and times
`Ledger.summary` (the call GET /payments-summary makes, in C over shared memory) for N = 1 to
--max-instances in use: over the contest's window (15 s) and over everything written (no
from/to). Prints the median and p99 per call in microseconds, and the segment's reserved bytes
(what the regions in use cost in memory). One process, one thread: run it on a quiet machine,
and state the load (printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from uuid import uuid4

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rinha.ledger import OWN, Ledger  # noqa: E402

T0 = 1_752_000_000


def timed(call, repeat: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeat):
        started = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - started)
    samples.sort()
    return statistics.median(samples) / 1000, samples[int(len(samples) * 0.99)] / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds-written", type=int, default=3600)
    parser.add_argument("--max-instances", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    name = f"/rinha-bench-{uuid4().hex[:8]}"
    ledger = Ledger.create(name, 131072, 16)
    last = T0 + args.seconds_written - 1
    print(f"load {os.getloadavg()[0]:.2f}; {args.seconds_written} s of cells per instance; "
          f"median / p99 of {args.repeat} calls, us")
    print("instances  15-s window      everything      reserved MiB")
    try:
        for instances in range(1, args.max_instances + 1):
            region = OWN if instances == 1 else ledger.assign_region(f"api{instances}")
            for second in range(T0, last + 1):
                ledger.store(region, second, 0, 10, 199_00)
                ledger.store(region, second, 1, 1, 19_90)
            window = timed(lambda: ledger.summary(last - 15, last - 1), args.repeat)
            everything = timed(lambda: ledger.summary(None, None), args.repeat // 10 or 1)
            reserved = Path("/dev/shm", name.lstrip("/")).stat().st_blocks * 512 / 2**20
            print(f"{instances:>9}  {window[0]:6.2f} / {window[1]:6.2f}  "
                  f"{everything[0]:7.1f} / {everything[1]:7.1f}  {reserved:8.1f}", flush=True)
    finally:
        ledger.close()
        Ledger.unlink(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
