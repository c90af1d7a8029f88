"""The fleet's usage and overrides layout (fleet.SharedUsage) over an in-memory bucket:
one object per device and node, summed on read, reset for every node at once."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from swiftftp.fleet import SharedUsage


class MemoryBucket:
    """What SharedUsage needs of fleet.Bucket, in a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def get(self, key: str) -> Any:
        return orjson.loads(self.objects[key]) if key in self.objects else None

    def put(self, key: str, body: bytes, content_type: str = "application/json") -> None:
        self.objects[key] = body

    def get_tagged(self, key: str) -> tuple[Any, str | None]:
        if key not in self.objects:
            return None, None
        return orjson.loads(self.objects[key]), str(hash(self.objects[key]))

    def create(self, key: str, value: Any) -> bool:
        if key in self.objects:
            return False
        self.objects[key] = orjson.dumps(value)
        return True

    def replace(self, key: str, value: Any, etag: str) -> bool:
        if key not in self.objects or str(hash(self.objects[key])) != etag:
            return False
        self.objects[key] = orjson.dumps(value)
        return True

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def listing(self, folder: str) -> list[tuple[str, Any]]:
        return [(key[len(folder):], 0) for key in sorted(self.objects) if key.startswith(folder)]


@given(st.lists(st.tuples(st.sampled_from(["a.test", "b.test:2223", "c/d"]),
                          st.sampled_from(["phone", "tablet"]), st.integers(0, 10**12)), max_size=30))
def test_each_node_writes_its_own_object_and_reads_the_sum(adds: list[tuple[str, str, int]]) -> None:
    bucket = MemoryBucket()
    nodes = {host: SharedUsage(bucket, host) for host in ("a.test", "b.test:2223", "c/d")}  # type: ignore[arg-type]
    for host, device, amount in adds:
        nodes[host].add("2026-11", {device: amount})
    reader = SharedUsage(bucket)  # type: ignore[arg-type]
    for device in ("phone", "tablet"):
        expected = sum(amount for _, d, amount in adds if d == device)
        assert reader.used("2026-11", device) == expected
        assert reader.used("2026-10", device) == 0
        writers = {host for host, d, _ in adds if d == device}
        assert len(bucket.listing(SharedUsage.folder("2026-11", device))) == len(writers)
    assert reader.all_used("2026-11") == {
        d: sum(amount for _, dd, amount in adds if dd == d) for d in {d for _, d, _ in adds}
    }


def test_a_reset_deletes_every_nodes_object_and_counting_starts_again() -> None:
    bucket = MemoryBucket()
    a, b = SharedUsage(bucket, "a"), SharedUsage(bucket, "b")  # type: ignore[arg-type]
    a.add("2026-11", {"phone": 100, "tablet": 7})
    b.add("2026-11", {"phone": 50})
    assert SharedUsage(bucket).reset("2026-11", "phone") == 2  # type: ignore[arg-type]
    assert a.used("2026-11", "phone") == 0 and a.used("2026-11", "tablet") == 7
    a.add("2026-11", {"phone": 5})  # counted after the reset: from 0 again
    assert b.used("2026-11", "phone") == 5


def test_a_reset_between_the_read_and_the_write_is_not_undone() -> None:
    """The CLI deletes a node's object while that node adds to it: the conditional write
    fails, the node reads again (nothing) and writes only its new bytes."""
    bucket = MemoryBucket()
    node = SharedUsage(bucket, "a")  # type: ignore[arg-type]
    node.add("2026-11", {"phone": 1000})
    read = bucket.get_tagged

    def read_then_reset(key: str) -> tuple[Any, str | None]:
        found = read(key)
        bucket.get_tagged = read  # type: ignore[method-assign]  # once
        SharedUsage(bucket).reset("2026-11", "phone")  # type: ignore[arg-type]
        return found

    bucket.get_tagged = read_then_reset  # type: ignore[method-assign]
    node.add("2026-11", {"phone": 7})
    assert node.used("2026-11", "phone") == 7


def test_overrides_change_one_field_at_a_time() -> None:
    shared = SharedUsage(MemoryBucket())  # type: ignore[arg-type]
    assert shared.overrides("phone") is None
    shared.set_overrides("phone", quota_bytes=1000)
    shared.set_overrides("phone", upload_rate=5, download_rate=None)
    assert shared.overrides("phone") == {"quota_bytes": 1000, "upload_rate": 5, "download_rate": None}
    shared.set_overrides("phone", quota_bytes=None)
    assert shared.overrides("phone") == {"quota_bytes": None, "upload_rate": 5, "download_rate": None}


def test_the_first_fleet_override_keeps_the_ones_set_before_the_fleet() -> None:
    shared = SharedUsage(MemoryBucket())  # type: ignore[arg-type]
    local = {"quota_bytes": 5000, "upload_rate": None, "download_rate": 9}
    shared.set_overrides("phone", local, upload_rate=1)
    assert shared.overrides("phone") == {"quota_bytes": 5000, "upload_rate": 1, "download_rate": 9}
    shared.set_overrides("phone", local, quota_bytes=None)  # the fleet's record counts now
    assert shared.overrides("phone") == {"quota_bytes": None, "upload_rate": 1, "download_rate": 9}
