"""A fleet of nodes sharing one S3 bucket (docs/design.md, "Fleet").

Nodes share three things, all kept in the bucket:

* the device id → prefix map, so a device keeps its prefix, and its user's
  bookmarked URL, on whichever node it logs in to (docs/protocol.md);
* the public server list devices pick a node from, kept fresh by heartbeats.
* quota usage and operators' per-device overrides (:class:`SharedUsage`);
* the Ed25519 key bound to a device id (:class:`SharedKeys`, :class:`FleetKeys`).

Layout, under an optional key prefix::

    devices/<android_id as hex>   {"prefix": "abcde"}        created once (If-None-Match: *)
    prefixes/<prefix>             {"android_id": "..."}      the claim that keeps a prefix unique
    nodes/<host>                  {"host": ..., "ftp_port": ..., "device_port": ...}  heartbeat
    servers                       one host name per line: the nodes heard from lately
    usage/<period>/<id as hex>/<host>  {"bytes": N}        written by that node only
    overrides/<id as hex>         {"quota_bytes": …, "upload_rate": …, "download_rate": …}
    keys/<id as hex>              {"key": "<base64>", "bound": <epoch>}   created once (If-None-Match: *)
                                  {"key": null, "unbound": <epoch>}      ``devices unbind`` (a tombstone)

Conditional creation (``If-None-Match: *``, which AWS S3, MinIO, Ceph and moto
honour) is what makes two nodes that see a new device at the same moment agree
on one prefix.  A node is alive while its heartbeat object is younger than
three heartbeats, judged by the S3 server's own clock (``LastModified``), so
the nodes' clocks do not matter.

Everything here but :class:`Membership` blocks on the network: the node calls
it from a thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import orjson

from . import logs
from .errors import ConfigError, FleetError

log = logging.getLogger("swiftftp.fleet")


class Bucket:
    """Small JSON objects in one S3 bucket, reached with boto3.  Every failure to
    reach it is a :class:`FleetError`."""

    def __init__(self, bucket: str, endpoint: str | None = None, key_prefix: str = "") -> None:
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise ConfigError("fleet.bucket: the fleet needs boto3 (pip install 'swiftftp[s3]')") from None
        self._errors = (BotoCoreError, ClientError)
        config = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"})
        self._s3 = boto3.client("s3", endpoint_url=endpoint or None, config=config)
        self.name = bucket
        self._prefix = key_prefix.strip("/") + "/" if key_prefix.strip("/") else ""

    def _request(self, method: str, expected: tuple[str, ...] = (), **params: Any) -> Any:
        """``s3.<method>(Bucket=…, **params)``; None for an error code in ``expected``."""
        try:
            return getattr(self._s3, method)(Bucket=self.name, **params)
        except self._errors as exc:
            response = getattr(exc, "response", None) or {}
            if str(response.get("Error", {}).get("Code", "")) in expected:
                return None
            raise FleetError(f"S3 bucket {self.name!r}: {exc}") from None

    def check(self) -> None:
        """Raise :class:`FleetError` unless the bucket can be reached."""
        self._request("head_bucket")

    def get(self, key: str) -> Any:
        """The object's JSON, or None if there is none."""
        found = self._request("get_object", ("NoSuchKey", "404"), Key=self._prefix + key)
        return None if found is None else orjson.loads(found["Body"].read())

    def create(self, key: str, value: Any) -> bool:
        """Write the object only if it does not exist yet; False if it did."""
        done = self._request(
            "put_object", ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"),
            Key=self._prefix + key, Body=orjson.dumps(value), ContentType="application/json",
            IfNoneMatch="*",
        )
        return done is not None

    def get_tagged(self, key: str) -> tuple[Any, str | None]:
        """The object's JSON and ETag, or (None, None) if there is none."""
        found = self._request("get_object", ("NoSuchKey", "404"), Key=self._prefix + key)
        if found is None:
            return None, None
        return orjson.loads(found["Body"].read()), found["ETag"]

    def replace(self, key: str, value: Any, etag: str) -> bool:
        """Overwrite the object only if it is still the one with ``etag`` (``If-Match``);
        False if it changed or is gone."""
        done = self._request(
            "put_object", ("PreconditionFailed", "412", "NoSuchKey", "404", "ConditionalRequestConflict",
                           "409"),
            Key=self._prefix + key, Body=orjson.dumps(value), ContentType="application/json",
            IfMatch=etag,
        )
        return done is not None

    def put(self, key: str, body: bytes, content_type: str = "application/json") -> None:
        self._request("put_object", Key=self._prefix + key, Body=body, ContentType=content_type)

    def delete(self, key: str) -> None:
        self._request("delete_object", Key=self._prefix + key)

    def listing(self, folder: str) -> list[tuple[str, Any]]:
        """(name under ``folder``, LastModified) of every object there."""
        found, token = [], None
        while True:
            more = {"ContinuationToken": token} if token else {}
            page = self._request("list_objects_v2", Prefix=self._prefix + folder, **more)
            for item in page.get("Contents", []):
                found.append((item["Key"][len(self._prefix + folder):], item["LastModified"]))
            token = page.get("NextContinuationToken")
            if not token:
                return found


class SharedPrefixes:
    """The fleet-wide device id → prefix map."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    def prefix_for(self, android_id: str, candidate: Callable[[int], str]) -> str:
        """The device's prefix, allotting one on its first login anywhere in the fleet;
        ``candidate(attempt)`` proposes a random prefix."""
        key = f"devices/{android_id.encode().hex()}"
        for attempt in range(100):
            if (known := self.bucket.get(key)) is not None:
                return known["prefix"]
            prefix = candidate(attempt)
            if not self.bucket.create(f"prefixes/{prefix}", {"android_id": android_id}):
                continue  # another device has it
            if self.bucket.create(key, {"prefix": prefix}):
                logs.event(log, "fleet_prefix_allotted", device=android_id, prefix=prefix)
                return prefix
            # another node is registering this device at the same moment (412, or 409
            # while its write is under way): give our claim back, read theirs next round
            self.bucket.delete(f"prefixes/{prefix}")
        raise RuntimeError("could not allot a unique prefix")


class ServerList:
    """This node's heartbeat, and the server list built from everyone's."""

    def __init__(self, bucket: Bucket, host: str, info: dict[str, Any], interval: float,
                 key: str = "servers") -> None:
        self.bucket = bucket
        self.host = host
        self.info = {"host": host, **info}
        self.interval = interval
        self.key = key

    def beat(self) -> list[str]:
        """Say this node is alive; rewrite and return the list of live nodes."""
        self.bucket.put(f"nodes/{self.host}", orjson.dumps(self.info))
        return self._publish()

    def leave(self) -> list[str]:
        """Take this node off the list (it is going away); the nodes left."""
        self.bucket.delete(f"nodes/{self.host}")
        return self._publish()

    def _publish(self) -> list[str]:
        nodes = self.bucket.listing("nodes/")
        if not nodes:
            alive = []
        else:
            # the newest heartbeat tells the S3 server's time: no node's clock is trusted
            cutoff = max(when for _, when in nodes) - timedelta(seconds=3 * self.interval)
            alive = sorted(host for host, when in nodes if when >= cutoff)
        self.bucket.put(self.key, "".join(f"{host}\n" for host in alive).encode(), "text/plain")
        return alive


class Membership:
    """A running node's place in the fleet: its heartbeat loop, and its leaving."""

    def __init__(self, server_list: ServerList) -> None:
        self.server_list = server_list
        self.host = server_list.host
        #: The server list as of the last heartbeat.
        self.servers: list[str] = []
        self.beats = 0
        self.left = False
        #: Why the last heartbeat failed; None while the bucket answers (readiness).
        self.error: str | None = None
        self._beat: asyncio.Future[list[str]] | None = None  # the one in flight

    async def join(self) -> None:
        self.servers = await asyncio.to_thread(self.server_list.beat)

    async def run(self) -> None:
        """Beat every interval until :meth:`leave`; an unreachable S3 only logs."""
        while True:
            await asyncio.sleep(self.server_list.interval)
            if self.left:
                return  # no beat may put this node back on the list
            self._beat = asyncio.ensure_future(asyncio.to_thread(self.server_list.beat))
            try:
                # shielded: a beat's thread runs to its end anyway; leave() waits for it
                self.servers = await asyncio.shield(self._beat)
                self.beats += 1
                if self.error is not None:
                    logs.event(log, "fleet_heartbeat_recovered")
                self.error = None
            except FleetError as exc:
                self.error = str(exc)
                logs.event(log, "fleet_heartbeat_failed", level=logging.WARNING, reason=str(exc))

    async def leave(self) -> list[str]:
        """Off the server list (once); the other nodes, where devices may go."""
        if self.left:
            return []
        self.left = True
        try:
            async with asyncio.timeout(10):
                if self._beat is not None:  # a beat in flight must land first
                    await asyncio.wait([self._beat])
                servers = await asyncio.to_thread(self.server_list.leave)
        except (FleetError, TimeoutError) as exc:
            logs.event(log, "fleet_leave_failed", level=logging.WARNING, reason=str(exc) or "timed out")
            return []
        logs.event(log, "fleet_left", host=self.host, servers=",".join(servers) or "-")
        self.servers = servers
        return [host for host in servers if host != self.host]


#: Overrides an operator may set per device, kept fleet-wide in ``overrides/<id as hex>``.
OVERRIDES = ("quota_bytes", "upload_rate", "download_rate")


class SharedUsage:
    """Quota usage and operators' overrides shared by the fleet (docs/design.md, "Fleet").

    Layout, beside the prefix map::

        usage/<period>/<id as hex>/<node host>   {"bytes": N}   that node's total for the period
        overrides/<id as hex>                    {"quota_bytes": …, "upload_rate": …, "download_rate": …}

    Each node writes only its own usage objects, so no two writers ever race on one
    object; a device's usage is the sum of what a listing of its folder holds.  Every
    method blocks on the network: a running node calls them from a thread.
    """

    def __init__(self, bucket: Bucket, host: str = "") -> None:
        self.bucket = bucket
        #: This node's name in the usage keys ("" for the CLI, which only reads and deletes).
        self.host = host.replace("/", "_")

    @staticmethod
    def folder(period: str, android_id: str) -> str:
        return f"usage/{period}/{android_id.encode().hex()}/"

    def add(self, period: str, amounts: dict[str, int]) -> None:
        """Add this node's new bytes to its own object of each device.  Read, add, write
        on the condition that the object is still the one read (``If-Match``, or
        ``If-None-Match: *`` for a new one): only ``reset`` (the CLI) deletes it meanwhile,
        and then the node starts again from 0, so a reset is never undone."""
        for android_id, amount in amounts.items():
            key = self.folder(period, android_id) + self.host
            for _ in range(5):
                current, etag = self.bucket.get_tagged(key)
                value = {"bytes": int((current or {}).get("bytes", 0)) + amount}
                if self.bucket.create(key, value) if etag is None else self.bucket.replace(key, value, etag):
                    break
            else:
                raise FleetError(f"S3 bucket {self.bucket.name!r}: {key} kept changing under this node")

    def used(self, period: str, android_id: str) -> int:
        """The device's usage in the period, summed over every node's object."""
        folder = self.folder(period, android_id)
        total = 0
        for name, _ in self.bucket.listing(folder):
            total += int((self.bucket.get(folder + name) or {}).get("bytes", 0))
        return total

    def all_used(self, period: str) -> dict[str, int]:
        """Every device's usage in the period (``devices list``): device id → bytes."""
        totals: dict[str, int] = {}
        for name, _ in self.bucket.listing(f"usage/{period}/"):
            device_hex, _, _node = name.partition("/")
            try:
                android_id = bytes.fromhex(device_hex).decode()
            except ValueError:
                continue  # not ours
            found = self.bucket.get(f"usage/{period}/{name}") or {}
            totals[android_id] = totals.get(android_id, 0) + int(found.get("bytes", 0))
        return totals

    def reset(self, period: str, android_id: str) -> int:
        """Delete every node's usage object of the device for the period; how many."""
        folder = self.folder(period, android_id)
        names = [name for name, _ in self.bucket.listing(folder)]
        for name in names:
            self.bucket.delete(folder + name)
        return len(names)

    def overrides(self, android_id: str) -> dict[str, int | None] | None:
        """The device's fleet-wide overrides; None if no operator ever set any."""
        found = self.bucket.get(f"overrides/{android_id.encode().hex()}")
        if found is None:
            return None
        return {name: found.get(name) for name in OVERRIDES}

    def set_overrides(self, android_id: str, seed: dict[str, int | None] | None = None,
                      **changes: int | None) -> None:
        """Change some of the device's overrides (None: back to the node's default); the
        first change starts from ``seed`` (the local registry's, set before the fleet)."""
        current = self.overrides(android_id) or dict(seed or dict.fromkeys(OVERRIDES))
        current.update(changes)
        self.bucket.put(f"overrides/{android_id.encode().hex()}", orjson.dumps(current))

    def android_id_for(self, prefix: str) -> str | None:
        """The device holding ``prefix`` in the fleet's map (a device never seen here)."""
        found = self.bucket.get(f"prefixes/{prefix}")
        return None if found is None else found.get("android_id")

    def prefix_of(self, android_id: str) -> str | None:
        found = self.bucket.get(f"devices/{android_id.encode().hex()}")
        return None if found is None else found.get("prefix")


class SharedKeys:
    """The fleet-wide device id → public key bindings (trust on first use, fleet-wide).

    ``keys/<id as hex>`` holds ``{"key": "<base64>", "bound": <epoch>}``, created with
    ``If-None-Match: *`` so that two nodes binding two keys at once agree on one.
    ``devices unbind`` overwrites it with a tombstone ``{"key": null, "unbound": <epoch>}``
    rather than deleting it: a node that finds *no* object while its own registry
    holds a key has a binding from before it joined the fleet, and publishes it; a
    node that finds the tombstone drops its own.  Blocks on the network."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    @staticmethod
    def name(android_id: str) -> str:
        return f"keys/{android_id.encode().hex()}"

    def read(self, android_id: str) -> dict[str, Any] | None:
        """The object (a binding or a tombstone); None if there never was one."""
        return self.bucket.get(self.name(android_id))

    def bind(self, android_id: str, key: str) -> str:
        """Bind ``key`` unless another key is bound; the key bound in the fleet now."""
        name = self.name(android_id)
        for _ in range(5):
            found, etag = self.bucket.get_tagged(name)
            value = {"key": key, "bound": int(time.time())}
            if found is None:
                if self.bucket.create(name, value):
                    logs.event(log, "fleet_key_bound", device=android_id)
                    return key
                continue  # another node bound it this moment: read theirs
            if found.get("key"):
                return str(found["key"])
            assert etag is not None
            if self.bucket.replace(name, value, etag):  # over the tombstone, if still that one
                logs.event(log, "fleet_key_bound", device=android_id)
                return key
        raise FleetError(f"S3 bucket {self.bucket.name!r}: {name} kept changing under this node")

    def reconcile(self, android_id: str, local: str) -> str | None:
        """A device bound to ``local`` in this node's registry did not prove that key:
        the fleet's key (``local`` published if the fleet has no record: a binding
        from before this node joined), or None if an operator unbound it fleet-wide."""
        found = self.read(android_id)
        if found is None:
            return self.bind(android_id, local)
        return str(found["key"]) if found.get("key") else None

    def listed(self) -> set[str]:
        """The device ids (as hex) that have an object: bound, or unbound by an operator."""
        return {name for name, _ in self.bucket.listing("keys/")}

    def unbind(self, android_id: str) -> None:
        """``devices unbind``: the tombstone (see the class)."""
        self.bucket.put(self.name(android_id), orjson.dumps({"key": None, "unbound": int(time.time())}))


#: A bucket call's answer when the bucket did not answer (in time).
UNKNOWN: Any = object()


class FleetKeys:
    """A running node's view of :class:`SharedKeys`, cached so that a login costs an
    S3 round trip only where the answer may have changed (README, "Device identity"):

    * a key read from the bucket is kept until a login fails to prove it (then the
      bucket is read again: that is how a node learns of ``devices unbind`` or of a
      new binding after it) or an operator unbinds the id through this node;
    * "not bound in the fleet" comes from a listing of ``keys/`` (one LIST for every
      login, whatever the device: a node's devices all coming back at once cost one
      request, not one each; made again in the background, the old one standing
      meanwhile, once ``unbound_ttl`` seconds old), and for an id unbound by an
      operator from its tombstone, kept as long. Within that window a binding made
      on another node is not seen here by a login *without* a key (a login *with*
      one binds, and binding always asks the bucket);
    * a bucket that does not answer within ``timeout`` is an outage: one WARNING,
      then ``backoff`` seconds without asking (no thread pile-up), answers UNKNOWN.

    Bucket calls run in a thread; this object lives on the node's loop."""

    def __init__(self, shared: SharedKeys, *, unbound_ttl: float = 60.0, timeout: float = 2.0,
                 backoff: float = 10.0) -> None:
        self.shared = shared
        self.unbound_ttl = unbound_ttl
        self.timeout = timeout
        self.backoff = backoff
        #: Keys the bucket holds (ids not bound in this node's registry).
        self.bound: dict[str, str] = {}
        self._unbound: dict[str, float] = {}  # id → monotonic time the answer goes stale
        self._listing: set[str] = set()  # ids (hex) with an object in keys/, as last listed
        self._listed_until = 0.0
        self._listing_now: asyncio.Future[Any] | None = None  # the listing in flight
        self._down_until = 0.0
        #: Why the bucket did not answer; None while it does.
        self.outage: str | None = None
        #: Bucket calls made (tests, stats).
        self.asked = 0

    async def ask(self, call: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """``call(*args)`` in a thread, bounded; UNKNOWN if the bucket did not answer."""
        if time.monotonic() < self._down_until:
            return UNKNOWN
        self.asked += 1
        try:
            async with asyncio.timeout(timeout or self.timeout):
                result = await asyncio.to_thread(call, *args)
        except (FleetError, TimeoutError) as exc:
            self._down_until = time.monotonic() + self.backoff
            if self.outage is None:
                logs.event(log, "fleet_keys_unreachable", level=logging.WARNING,
                           reason=str(exc) or f"no answer within {self.timeout:g} s",
                           effect="logins of ids not bound on this node are accepted without proof")
            self.outage = str(exc) or "timed out"
            return UNKNOWN
        if self.outage is not None:
            logs.event(log, "fleet_keys_recovered")
            self.outage = None
        return result

    async def _in_listing(self, android_id: str) -> Any:
        """Whether the id has an object in ``keys/`` (UNKNOWN if the bucket did not
        answer); from the last listing while it is fresh, else one listing shared by
        every login that waits for it."""
        if time.monotonic() >= self._listed_until:
            if self._listing_now is None or self._listing_now.done():
                self._listing_now = asyncio.ensure_future(self._list())
            if self._listed_until == 0.0:  # none yet: wait for the first (bounded)
                found = await asyncio.shield(self._listing_now)
                if found is UNKNOWN:
                    return UNKNOWN
            # else the last listing stands while the next one is made (a large keys/
            # takes a few pages): no login waits for it
        return android_id.encode().hex() in self._listing

    async def _list(self) -> Any:
        started = time.monotonic()
        # the first listing is waited for by logins; later ones run beside them
        found = await self.ask(self.shared.listed, timeout=self.timeout if not self._listed_until else 30.0)
        if found is not UNKNOWN:
            self._listing, self._listed_until = found, started + self.unbound_ttl
        return found

    def forget(self, android_id: str) -> None:
        self.bound.pop(android_id, None)
        self._unbound.pop(android_id, None)

    def _note(self, android_id: str, found: dict[str, Any] | None) -> str | None:
        key = str(found["key"]) if found and found.get("key") else None
        if key is None:
            self.bound.pop(android_id, None)
            self._unbound[android_id] = time.monotonic() + self.unbound_ttl
        else:
            self.bound[android_id] = key
            self._unbound.pop(android_id, None)
        return key

    async def key_of(self, android_id: str, offered: str | None, *, reread: bool = True) -> str | None:
        """The key the login of an id not bound on this node must prove; None: none
        (unbound in the fleet, or the bucket unreachable: open, logged). A cached key
        the login does not prove is read again (it may have been unbound) if ``reread``."""
        cached = self.bound.get(android_id)
        if cached is None:
            if self._unbound.get(android_id, 0.0) > time.monotonic():
                return None
            listed = await self._in_listing(android_id)
            if listed is UNKNOWN or not listed:
                return None  # not bound in the fleet (or the bucket down: open)
        elif cached == offered or not reread:
            return cached
        found = await self.ask(self.shared.read, android_id)  # first look, or the cached key failed
        if found is UNKNOWN:
            return cached  # a key seen bound stays bound (closed); else open
        return self._note(android_id, found)

    async def reconcile(self, android_id: str, local: str) -> str | None:
        """An id bound to ``local`` here, whose login did not prove ``local``: the key
        the fleet binds (None: unbound fleet-wide); ``local`` if the bucket is down."""
        self.forget(android_id)  # what this node read before is stale too
        found = await self.ask(self.shared.reconcile, android_id, local)
        return local if found is UNKNOWN else found

    async def bind(self, android_id: str, key: str) -> str | None:
        """Bind ``key`` fleet-wide unless another is; the fleet's key, or None if the
        bucket did not answer (then nothing is bound anywhere)."""
        if self.bound.get(android_id) == key:
            return key  # read from the bucket by this very login
        found = await self.ask(self.shared.bind, android_id, key)
        if found is UNKNOWN:
            return None
        self._note(android_id, {"key": found})
        self._listing.add(android_id.encode().hex())
        return str(found)
