"""Sync through Redis: the carrier for instances on several hosts (SYNC_URL=redis://...).

Runs in the dispatcher's asyncio loop, in place of peers.py's UDP carrier, and tells the rest
of the dispatcher nothing new: the recorder reports the OWN cells of each loop turn, a purge,
the polled health (mirror.Carrier). The data model, the scripts and why pub/sub plus a periodic
read are in redis_store.py. What this instance does:
  - writes the OWN cells recorded since its last write in one script call (the larger count
    kept server-side) that also publishes them; one call in flight at a time, so under load
    the cells of several loop turns go together, never one call per payment (the dispatcher's
    CPU budget, docs/measurements.md). A failed write keeps its cells for the next one;
  - hears the others' messages on the channel and merges their cells into their regions;
  - every SYNC_RESEND_S, reads every other instance's cells written in the last
    RESEND_WINDOW_S seconds (Redis's clock), which heals whatever pub/sub lost, and checks that
    Redis still holds the epoch and this instance's own cells;
  - on each (re)connection, and when Redis turns out to have lost its data, exchanges
    everything: its whole region written back, every region read (including its own, for a
    dispatcher that started while Redis was down);
  - a purge: a new epoch (older keys deleted), a PURGE message; an instance that hears of a
    newer epoch, by message or by the periodic read, purges its own ledger.
The summary never waits on any of this: workers read shared memory only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from rinha import metrics, wire
from rinha.health import HealthReport
from rinha.ledger import OWN, Ledger
from rinha.metrics import DispatcherCounters
from rinha.mirror import merge_cells, merge_subject, region_cells, region_of
from rinha.redis_store import (
    CELLS_PER_WRITE,
    CHANNEL,
    EPOCH_KEY,
    MEMBERS_KEY,
    PURGE,
    READ_RECENT,
    WRITE,
    adopt_epoch,
    cells_key,
    parse_cell,
    parse_hash,
    recent_key,
    write_args,
)
from rinha.settings import Settings

log = logging.getLogger("rinha.redis")

RESEND_WINDOW_S = 60
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0


class RedisSync:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        on_health: Callable[[HealthReport], None],
        counters: DispatcherCounters | None = None,
    ) -> None:
        assert settings.sync_url is not None
        self._settings = settings
        self._name = settings.instance_name
        self._ledger = ledger
        self._on_health = on_health
        self._counters = counters
        self._pending: set[tuple[int, int]] = set()  # OWN cells not yet written
        self._purge_pending = False
        self._outbox: list[bytes] = []  # messages to publish (health)
        self._full_needed = True
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None
        self.dropped_malformed = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._run())

    # Told by the dispatcher ------------------------------------------------------------------

    def recorded(self, cells: set[tuple[int, int]]) -> None:
        self._pending |= cells
        self._wake.set()

    def purged(self) -> None:
        self._purge_pending = True
        self._wake.set()

    def share_health(self, report: HealthReport) -> None:
        self._outbox.append(wire.encode_health(self._name, report.processor, report.failing,
                                               report.min_response_ms))
        self._wake.set()

    # The connection's life ------------------------------------------------------------------

    async def _run(self) -> None:
        import redis
        import redis.asyncio as aioredis

        backoff = BACKOFF_MIN_S
        while True:
            client = aioredis.Redis.from_url(self._settings.sync_url, socket_timeout=5,
                                             socket_connect_timeout=2)
            try:
                await self._session(client)
            except (TimeoutError, redis.RedisError, OSError) as exc:
                if self._failing_since is None:
                    self._failing_since = asyncio.get_running_loop().time()
                    backoff = BACKOFF_MIN_S
                    log.warning("Redis at %s: %r; retrying (the summary goes on from local "
                                "memory)", self._settings.sync_url, exc)
                else:
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                self._full_needed = True
            finally:
                await client.aclose()
            await asyncio.sleep(backoff)

    async def _session(self, client) -> None:  # type: ignore[no-untyped-def]
        self._write_script = client.register_script(WRITE)
        self._read_script = client.register_script(READ_RECENT)
        self._purge_script = client.register_script(PURGE)
        pubsub = client.pubsub()
        try:
            # Subscribed first: a message sent while the exchange runs waits for us.
            await pubsub.subscribe(CHANNEL)
            if self._purge_pending:
                await self._purge(client)  # before the exchange could write old cells back
            await self._full_exchange(client)
            if self._failing_since is not None:
                log.warning("Redis at %s answers again", self._settings.sync_url)
                self._failing_since = None
            tasks = [asyncio.ensure_future(coroutine) for coroutine in
                     (self._listen(pubsub), self._heal(client), self._write(client))]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for task in tasks:
                    task.cancel()
            for task in done:
                task.result()  # raises what ended the session
        finally:
            await pubsub.aclose()

    # Writing --------------------------------------------------------------------------------

    async def _write(self, client) -> None:  # type: ignore[no-untyped-def]
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._purge_pending:
                await self._purge(client)
            if self._full_needed:
                await self._full_exchange(client)
            if self._pending:
                cells, self._pending = self._pending, set()
                values = [(s, p, *self._ledger.own_cell(s, p)) for s, p in sorted(cells)]
                # The nonce is the epoch the cells belong to: a receiver drops them once it
                # knows of a later purge, however late pub/sub delivers them.
                messages = wire.encode_cells(wire.CELLS, self._name, self._name, values,
                                             self._ledger.sync_epoch) \
                    if self._settings.sync_push else []
                try:
                    await self._store(values, messages)
                except BaseException:
                    self._pending |= cells  # written with the next call, or the exchange
                    raise
            if self._outbox:
                messages, self._outbox = self._outbox, []
                for message in messages:
                    await client.publish(CHANNEL, message)
                self._count(metrics.SYNC_SENT, len(messages))

    async def _store(self, cells: list[wire.Cell], messages: list[bytes]) -> None:
        epoch = self._ledger.sync_epoch
        keys = [EPOCH_KEY, MEMBERS_KEY, cells_key(epoch, self._name),
                recent_key(epoch, self._name)]
        in_redis, lost = await self._write_script(
            keys=keys, args=[epoch, self._name, CHANNEL, len(messages), *messages,
                             *write_args(cells)])
        if in_redis > epoch:
            adopt_epoch(self._ledger, in_redis)  # purged meanwhile: so are these cells
        elif in_redis < epoch:
            log.warning("Redis holds epoch %d, older than this ledger's %d: an instance that "
                        "missed a purge recreated it", in_redis, epoch)
        elif lost:
            log.warning("Redis had lost its data (restarted without persistence?): writing "
                        "this instance's cells back")
            self._full_needed = True
            self._wake.set()
        else:
            self._count(metrics.SYNC_SENT, len(messages))

    async def _purge(self, client) -> None:  # type: ignore[no-untyped-def]
        epoch = int(await self._purge_script(keys=[EPOCH_KEY, MEMBERS_KEY]))
        self._purge_pending = False
        self._pending.clear()  # the worker purged the ledger: nothing older is to be written
        self._ledger.sync_epoch = epoch
        # Between the worker's purge and this moment a periodic read or a message could have
        # brought the others' old cells back; from now on only the new epoch's can arrive.
        for region in self._ledger.mirrors().values():
            self._ledger.purge(region)
        await client.publish(CHANNEL, wire.encode_datagram(wire.PURGE, self._name, epoch))
        log.info("purged the deployment: Redis epoch %d", epoch)

    async def _full_exchange(self, client) -> None:  # type: ignore[no-untyped-def]
        """Everything both ways: this instance's region into Redis (larger counts kept), every
        region out of it (this instance's own too: its dispatcher may have started while Redis
        was down, so the supervisor's recovery may not have happened)."""
        self._full_needed = False
        await client.set(EPOCH_KEY, max(self._ledger.sync_epoch, 1), nx=True)
        adopt_epoch(self._ledger, int(await client.get(EPOCH_KEY)))
        own = region_cells(self._ledger, OWN)
        for start in range(0, len(own), CELLS_PER_WRITE):
            await self._store(own[start:start + CELLS_PER_WRITE], [])
        epoch = self._ledger.sync_epoch
        members = [m.decode() for m in await client.smembers(MEMBERS_KEY)]
        others = [m for m in members if m != self._name]
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(cells_key(epoch, self._name))
        for member in others:
            pipe.hgetall(cells_key(epoch, member))
        mine, *theirs = await pipe.execute()
        merge_cells(self._ledger, OWN, parse_hash(mine))
        for member, mapping in zip(others, theirs, strict=True):
            merge_subject(self._ledger, self._name, member, parse_hash(mapping))
        log.info("exchanged every cell with Redis (epoch %d, %d other instances)", epoch,
                 len(others))

    # Reading --------------------------------------------------------------------------------

    async def _heal(self, client) -> None:  # type: ignore[no-untyped-def]
        window_ms = RESEND_WINDOW_S * 1000
        while True:
            await asyncio.sleep(self._settings.sync_resend_s)
            result = await self._read_script(keys=[EPOCH_KEY, MEMBERS_KEY],
                                             args=[self._name, window_ms])
            epoch, mine_exists, rest = result[0], result[1], result[2:]
            if epoch is None or (not mine_exists and self._ledger.seconds_written(OWN)):
                log.warning("Redis has lost %s: writing this instance's cells back",
                            "the epoch" if epoch is None else "this instance's cells")
                self._full_needed = True
                self._wake.set()
                continue
            if epoch != self._ledger.sync_epoch:
                if epoch > self._ledger.sync_epoch:
                    adopt_epoch(self._ledger, epoch)
                continue  # older: read before a purge this instance made, stale
            for i in range(0, len(rest), 3):
                member = rest[i].decode()
                cells = [cell for f, v in zip(rest[i + 1], rest[i + 2], strict=True)
                         if (cell := parse_cell(f, v)) is not None]
                merge_subject(self._ledger, self._name, member, cells)

    async def _listen(self, pubsub) -> None:  # type: ignore[no-untyped-def]
        async for message in pubsub.listen():
            if message.get("type") == "message":
                self.handle(message["data"])

    def handle(self, data: bytes) -> None:
        """One message from the channel (our own come back too, and are skipped)."""
        try:
            kind, nonce, origin, payload = wire.decode_datagram(data)
            if origin == self._name:
                return
            region = region_of(self._ledger, self._name, origin)
            if kind == wire.CELLS:
                subject, cells = wire.decode_cells(payload)
                if subject != origin:
                    raise wire.MalformedDatagram(f"{origin} sent cells of {subject}")
                if nonce > self._ledger.sync_epoch:
                    adopt_epoch(self._ledger, nonce)  # a purge this instance missed
                if region is not None and nonce == self._ledger.sync_epoch:
                    merge_cells(self._ledger, region, cells)
            elif kind == wire.PURGE:
                if nonce > self._ledger.sync_epoch:
                    adopt_epoch(self._ledger, nonce)
            elif kind == wire.HEALTH:
                self._on_health(HealthReport(*wire.decode_health(payload)))
        except wire.MalformedDatagram as exc:
            self.dropped_malformed += 1
            self._count(metrics.SYNC_MALFORMED)
            log.warning("dropped a malformed sync message (%s; %d so far)", exc,
                        self.dropped_malformed)
            return
        self._count(metrics.SYNC_RECEIVED)
        if self._counters is not None:
            self._counters.heard_peer(region)

    def _count(self, index: int, value: int = 1) -> None:
        if self._counters is not None and value:
            self._counters.sync(index, value)
