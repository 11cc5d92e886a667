"""How soon a payment counted by one instance shows in its peer's summary.

docs/architecture.md, invariant 6: a recorded cell is pushed in the loop turn that recorded it.

  python benchmarks/peer_visibility.py [--rate 300] [--samples 40] [--batch-s 0.01]

Starts two processor emulators (the default answering after 90 ms) and a peered pair of
`rinha serve` instances (UDP sync, as compose runs them) and loads both with --rate payments/s
in total. Then, --samples times: reads api1's total and times how long until api2's total
reaches it. Under load both totals keep rising, so this is an upper bound of the sync delay
plus one summary round trip. With --rate 0 each sample first posts one payment to api1 and
waits until api1 counts it. DISPATCH_BATCH_S of both instances is --batch-s.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.processes import Emulator, Instance, payment_body, peered_pair  # noqa: E402

JSON = {"Content-Type": "application/json"}


def total(client: httpx.Client, instance: Instance) -> int:
    summary = client.get(instance.url + "/payments-summary").json()
    return summary["default"]["totalRequests"] + summary["fallback"]["totalRequests"]


def load(instances: tuple[Instance, Instance], rate: float, stop: threading.Event) -> None:
    """Open-loop POSTs alternating between the instances until `stop` is set."""
    async def run() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            pending: set[asyncio.Future] = set()
            started = time.perf_counter()
            sent = 0
            while not stop.is_set():
                url = instances[sent % 2].url + "/payments"
                future = asyncio.ensure_future(client.post(url, content=payment_body(),
                                                           headers=JSON))
                pending.add(future)
                future.add_done_callback(pending.discard)
                sent += 1
                await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
            if pending:
                await asyncio.wait(pending)

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=300.0, help="payments/s, both instances")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--batch-s", default="0.01", help="DISPATCH_BATCH_S of both instances")
    args = parser.parse_args()

    default, fallback = Emulator(0.05), Emulator(0.15)
    started: list[Instance] = []
    stop = threading.Event()
    try:
        default.set_delay(90)
        api1, api2 = peered_pair(default, fallback, DISPATCH_BATCH_S=args.batch_s)
        started += [api1, api2]
        loader = None
        if args.rate > 0:
            loader = threading.Thread(target=load, args=((api1, api2), args.rate, stop))
            loader.start()
            time.sleep(2)  # let the load settle
        gaps_ms = []
        with httpx.Client(timeout=5) as client:
            for _ in range(args.samples):
                if args.rate == 0:  # one payment, and wait until api1 has counted it
                    before = total(client, api1)
                    client.post(api1.url + "/payments", content=payment_body(), headers=JSON)
                    while total(client, api1) == before:
                        pass
                target = total(client, api1)
                seen_at = time.perf_counter()
                while total(client, api2) < target:
                    pass
                gaps_ms.append((time.perf_counter() - seen_at) * 1000)
                time.sleep(random.uniform(0.02, 0.1))
        stop.set()
        if loader is not None:
            loader.join()
    finally:
        stop.set()
        for process in (*started, default, fallback):
            process.stop()
    gaps_ms.sort()
    print(f"DISPATCH_BATCH_S {args.batch_s}, load {args.rate:g} payments/s, "
          f"{len(gaps_ms)} samples: median {statistics.median(gaps_ms):.2f} ms, "
          f"p90 {gaps_ms[int(len(gaps_ms) * 0.9)]:.2f} ms, max {gaps_ms[-1]:.2f} ms")


if __name__ == "__main__":
    main()
