"""The device session layer's state machines without sockets: the outbox's pacing
rules, the rendezvous, the grace from evidence, the keepalive wheel, and the
login as the control connection's rewriter follows it."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from swiftftp.ftp import ControlRewriter
from swiftftp.outbox import RENDEZVOUS_FLOOR, Outbox, rendezvous_grace
from swiftftp.rendezvous import MAX_CANDIDATES, MAX_FAILURES, Rendezvous
from swiftftp.timers import Wheel

GRACE = 0.01


def written(outbox: Outbox, now: float, unacked: int = 0) -> tuple[list[bytes], float | None]:
    items, wake = outbox.writable(now, lambda: unacked)
    return [data for data, _ in items], wake


def test_a_stream_device_gets_everything_at_once() -> None:
    box = Outbox(paced=False, grace=GRACE)
    r = Rendezvous(40000, "10.0.0.1")
    box.notify(b"ccw", r)
    box.notify(b"noop")
    box.reply(b"{}")
    assert written(box, 0.0, unacked=99) == ([b"{}", b"ccw", b"noop"], None)
    assert r.written and r.written_at == 0.0


def test_after_control_connection_waiting_nothing_until_the_device_logged_in() -> None:
    box = Outbox(paced=True, grace=GRACE)
    first, second = Rendezvous(40000, "10.0.0.1"), Rendezvous(40001, "10.0.0.1")
    box.notify(b"ccw1", first)
    box.notify(b"ccw2", second)
    box.notify(b"noop")
    assert written(box, 0.0) == ([b"ccw1"], None)  # no timer: only evidence frees it
    # acknowledged, seconds later: still held, the device's reader is busy connecting
    assert written(box, 5.0, unacked=0) == ([], None)
    box.reply(b"{}")  # not even a reply gets past an unread message
    assert written(box, 5.0) == ([], None)
    box.release(first)  # the device logged in on 40000
    assert written(box, 5.1) == ([b"{}"], 5.1 + GRACE)
    assert written(box, 5.1 + GRACE) == ([b"ccw2"], None)
    assert second.written and not first.done  # done is the rendezvous' own business


def test_a_message_waits_for_the_acknowledgement_and_the_grace() -> None:
    box = Outbox(paced=True, grace=GRACE)
    box.notify(b"a")
    box.notify(b"b")
    assert written(box, 1.0) == ([b"a"], 1.0 + GRACE)
    assert written(box, 1.005) == ([], 1.0 + GRACE)  # the grace first
    items, wake = written(box, 1.02, unacked=17)  # then the acknowledgement, polled
    assert items == [] and wake is not None and 1.02 < wake < 1.03
    assert written(box, wake, unacked=0) == ([b"b"], None)


def test_no_grace_the_round_trip_already_covered() -> None:
    """On a 100 ms link the acknowledgement comes after the grace: nothing is added."""
    box = Outbox(paced=True, grace=GRACE)
    box.notify(b"a")
    box.notify(b"b")
    written(box, 0.0)
    assert written(box, 0.1, unacked=0) == ([b"b"], None)  # as soon as acknowledged


def test_replies_go_before_notices_waiting() -> None:
    box = Outbox(paced=True, grace=GRACE)
    box.notify(b"noop")
    box.reply(b"{}")
    assert written(box, 0.0)[0] == [b"{}"]
    assert written(box, 1.0)[0] == [b"noop"]


def test_a_rendezvous_that_ends_before_it_is_written_is_dropped() -> None:
    box = Outbox(paced=True, grace=GRACE)
    busy, gone = Rendezvous(40000, "10.0.0.1"), Rendezvous(40001, "10.0.0.1")
    box.notify(b"ccw1", busy)
    box.notify(b"ccw2", gone)
    written(box, 0.0)
    box.release(gone)  # its client left while it waited
    assert len(box) == 0 and not gone.written
    box.release(busy)
    assert written(box, 1.0) == ([], None)


def test_raw_bytes_after_a_final_reply() -> None:
    """DeviceChannel.settle: the grace from the reply's write, and the acknowledgement."""
    box = Outbox(paced=True, grace=GRACE)
    box.wrote(2.0)
    assert box.ready(2.0, lambda: 0) == 2.0 + GRACE
    assert box.ready(2.0 + GRACE, lambda: 5) is not None
    assert box.ready(2.0 + GRACE, lambda: 0) is None
    stream = Outbox(paced=False, grace=GRACE)
    stream.wrote(2.0)
    assert stream.ready(2.0, lambda: 5) is None


@given(st.lists(st.sampled_from(["reply", "notify", "ccw", "release", "tick"]), max_size=40))
def test_never_two_messages_unread_by_a_paced_device(steps: list[str]) -> None:
    """Whatever happens, a paced device is never written a message while one it has
    not provably read is out (a ccw until released, others until acknowledged plus
    the grace)."""
    box = Outbox(paced=True, grace=GRACE)
    now = 0.0
    out: list[tuple[float, Rendezvous | None]] = []  # what was written, when
    open_ = []
    for step in steps:
        now += 0.004
        if step == "reply":
            box.reply(b"r")
        elif step == "notify":
            box.notify(b"n")
        elif step == "ccw":
            r = Rendezvous(1, "10.0.0.1")
            open_.append(r)
            box.notify(b"c", r)
        elif step == "release" and open_:
            box.release(open_.pop(0))
        items, _ = box.writable(now, lambda: 0)
        assert len(items) <= 1
        for _, rendezvous in items:
            if out:
                last_time, last_rendezvous = out[-1]
                if last_rendezvous is not None:
                    assert last_rendezvous not in open_  # released: the device logged in
                else:
                    assert now >= last_time + GRACE
            out.append((now, rendezvous))


def test_rendezvous_hears_only_the_device() -> None:
    r = Rendezvous(40000, "198.51.100.7")
    assert not r.admit("203.0.113.9")
    assert all(r.admit("198.51.100.7") for _ in range(MAX_CANDIDATES))
    assert not r.admit("198.51.100.7")  # that many at once at most
    r.candidate_left()
    assert r.admit("198.51.100.7")


def test_rendezvous_failures_count_only_what_the_device_was_told() -> None:
    told, queued = Rendezvous(1, "10.0.0.1"), Rendezvous(2, "10.0.0.1")
    told.written = True
    assert told.over("timeout", 1) == 2
    assert queued.over("timeout", 2) == 2  # it waited behind the first: not the device's
    assert Rendezvous(3, "10.0.0.1").over("abandoned", 2) == 2
    assert Rendezvous(4, "10.0.0.1").over("taken", 2) == 0
    assert MAX_FAILURES == 3


def test_rendezvous_grace_from_the_device_reaction() -> None:
    assert rendezvous_grace(0.0001, 0.01) == RENDEZVOUS_FLOOR  # a quick device: the floor
    assert rendezvous_grace(0.004, 0.01) == 0.008  # twice its reaction
    assert rendezvous_grace(0.3, 0.01) == 0.01  # never more than device_grace
    r = Rendezvous(1, "10.0.0.1")
    assert r.reaction(5.0) is None
    r.written, r.written_at = True, 4.9
    assert abs(r.reaction(5.0) - 0.1) < 1e-9


def test_the_wheel_calls_each_when_due_and_again_when_asked() -> None:
    calls: list[tuple[str, float]] = []

    class Item:
        def __init__(self, name: str, every: float | None) -> None:
            self.name, self.every = name, every

        def tick(self, now: float) -> float | None:
            calls.append((self.name, now))
            return None if self.every is None else now + self.every

    async def main() -> None:
        loop = asyncio.get_running_loop()
        wheel = Wheel(resolution=0.05)
        start = loop.time()
        wheel.add(Item("once", None), start + 0.1)
        wheel.add(Item("often", 0.1), start + 0.05)
        await asyncio.sleep(0.42)
        wheel.close()
        by_name = {name: [t - start for n, t in calls if n == name] for name in ("once", "often")}
        assert len(by_name["once"]) == 1 and by_name["once"][0] >= 0.1
        assert 3 <= len(by_name["often"]) <= 5
        assert all(b - a >= 0.1 - 1e-3 for a, b in zip(by_name["often"], by_name["often"][1:], strict=False))
        assert len(wheel) == 0

    asyncio.run(main())


def test_the_rewriter_follows_the_login() -> None:
    r = ControlRewriter("198.51.100.7", "203.0.113.1")
    r.command(b"USER bob\r\n")
    r.reply(b"331 Password?\r\n")
    r.command(b"PASS wrong\r\n")
    r.reply(b"530 Login incorrect.\r\n")
    assert (r.logged_in, r.failures) == (False, 1)
    r.command(b"PASS right\r\n")
    r.reply(b"230-Welcome\r\n")
    assert not r.logged_in  # a multi-line reply counts at its last line
    r.reply(b"230 Logged in.\r\n")
    assert (r.logged_in, r.failures) == (True, 1)
    r.command(b"CWD /x\r\n")
    r.reply(b"530 Not allowed here.\r\n")  # after the login: not a login failure
    assert r.failures == 1
