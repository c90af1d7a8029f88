"""The fleet's device keys (fleet.SharedKeys) and a node's cache of them
(fleet.FleetKeys) over an in-memory bucket: first binding wins, tombstones,
what is cached and for how long, and an unreachable bucket."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from swiftftp.errors import FleetError
from swiftftp.fleet import FleetKeys, SharedKeys
from tests.unit.test_shared_usage import MemoryBucket


class CountingBucket(MemoryBucket):
    """Counts reads; ``down`` makes every call a FleetError."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.lists = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise FleetError("S3 bucket 'test': unreachable")

    def get(self, key: str) -> Any:
        self._check()
        self.reads += 1
        return super().get(key)

    def get_tagged(self, key: str) -> tuple[Any, str | None]:
        self._check()
        self.reads += 1
        return super().get_tagged(key)

    def create(self, key: str, value: Any) -> bool:
        self._check()
        return super().create(key, value)

    def replace(self, key: str, value: Any, etag: str) -> bool:
        self._check()
        return super().replace(key, value, etag)

    def listing(self, folder: str) -> list[tuple[str, Any]]:
        self._check()
        self.lists += 1
        return super().listing(folder)


def test_first_binding_wins_and_a_tombstone_lets_a_new_one_in() -> None:
    bucket = MemoryBucket()
    keys = SharedKeys(bucket)  # type: ignore[arg-type]
    assert keys.read("phone") is None
    assert keys.bind("phone", "K1") == "K1"
    assert keys.bind("phone", "K2") == "K1"
    assert set(bucket.objects) == {f"keys/{b'phone'.hex()}"}
    keys.unbind("phone")
    tombstone = keys.read("phone")
    assert tombstone is not None and tombstone["key"] is None and tombstone["unbound"] > 0
    assert keys.reconcile("phone", "K1") is None  # unbound fleet-wide: the node drops its own
    assert keys.bind("phone", "K2") == "K2"
    assert keys.reconcile("phone", "K1") == "K2"  # rebound fleet-wide: the node follows
    assert keys.reconcile("tablet", "K3") == "K3"  # a node's own binding, published
    assert keys.read("tablet")["key"] == "K3"


def test_the_cache_reads_once_per_ttl_and_again_when_a_proof_fails() -> None:
    async def run() -> None:
        bucket = CountingBucket()
        shared = SharedKeys(bucket)  # type: ignore[arg-type]
        cache = FleetKeys(shared, unbound_ttl=60)
        results = await asyncio.gather(*(cache.key_of(f"field-{i}", None) for i in range(50)))
        assert results == [None] * 50
        assert await cache.key_of("field-0", None) is None
        assert (bucket.lists, bucket.reads) == (1, 0)  # one listing for all, then from memory
        shared.bind("agent", "K1")
        assert await cache.key_of("agent", None) is None  # the window: bound after the listing
        cache._listed_until = 1.0  # the listing is unbound_ttl old: made again in the background,
        assert await cache.key_of("agent", None) is None  # the old one standing meanwhile
        assert cache._listing_now is not None
        await cache._listing_now
        assert bucket.lists == 2
        reads = bucket.reads
        assert await cache.key_of("agent", "K1") == "K1"
        assert await cache.key_of("agent", "K1") == "K1"
        assert bucket.reads == reads + 1  # the key cached while it is proven
        shared.unbind("agent")
        assert await cache.key_of("agent", None) is None  # not proven: read again, unbound now
        assert await cache.key_of("agent", "K1", reread=False) is None
        assert await cache.bind("agent", "K2") == "K2"
        assert await cache.bind("agent", "K2") == "K2"
        assert shared.read("agent")["key"] == "K2"

    asyncio.run(run())


def test_an_unreachable_bucket_is_open_for_unknown_ids_closed_for_known_keys(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run() -> None:
        bucket = CountingBucket()
        shared = SharedKeys(bucket)  # type: ignore[arg-type]
        shared.bind("agent", "K1")
        cache = FleetKeys(shared, unbound_ttl=0, backoff=60)
        assert await cache.key_of("agent", "K1") == "K1"
        bucket.down = True
        assert await cache.key_of("field", None) is None  # open
        assert await cache.key_of("agent", None) == "K1"  # closed: the key seen stays
        assert await cache.reconcile("agent", "K1") == "K1"
        assert await cache.bind("new", "K9") is None  # nothing bound
        assert cache.outage is not None
        asked = cache.asked
        assert await cache.key_of("field", None) is None
        assert cache.asked == asked  # backing off: no thread per login during the outage
        if cache._listing_now is not None:
            await cache._listing_now  # the one the outage began with
        bucket.down = False
        cache.backoff, cache._down_until = 0, 0.0
        assert await cache.key_of("field", None) is None  # a listing in the background…
        assert cache._listing_now is not None
        await cache._listing_now
        assert cache.outage is None  # …that says the bucket is back

    asyncio.run(run())
    warnings = [r for r in caplog.records if getattr(r, "event", "") == "fleet_keys_unreachable"]
    assert len(warnings) == 1
