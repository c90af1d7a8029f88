"""Admission and guessing limits without sockets: per address group (IPv6 by /64),
node-wide caps from the descriptor limit, the lockout that closes connections
already open, and the node-wide guess budget."""

from __future__ import annotations

import time

from swiftftp.config import Settings
from swiftftp.limits import Admission, Capacity, Guard, RecentEvents
from swiftftp.net import address_group


def guard(**settings: object) -> Guard:
    s = Settings(**settings)  # type: ignore[arg-type]
    return Guard(s, Capacity(s, nofile=1000))


def test_the_descriptor_limit_gives_the_caps() -> None:
    capacity = Capacity(Settings(), nofile=262144)
    assert (capacity.command_sessions, capacity.pending) == (131072, 65536)
    assert "262144" in capacity.describe()
    set_by_hand = Capacity(Settings(max_command_sessions=10, max_pending_connections=5), nofile=262144)
    assert (set_by_hand.command_sessions, set_by_hand.pending) == (10, 5)


def test_ipv6_addresses_count_by_their_64() -> None:
    same = address_group("2001:db8:1:2:aaaa::1")
    assert same == address_group("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_group("2001:db8:1:3::1") != address_group("2001:db8:1:2::1")
    assert address_group("2001:db8:1:2:aaaa::1", 48) == "2001:db8:1::/48"
    assert address_group("198.51.100.7") == "198.51.100.7"
    g = guard(max_connections_per_ip=2)
    assert isinstance(g.admit("2001:db8::1"), Admission)
    assert isinstance(g.admit("2001:db8::ffff:2"), Admission)
    assert g.admit("2001:db8::3") == "too many connections from this address"  # same /64
    assert isinstance(g.admit("2001:db8:0:1::1"), Admission)  # another /64


def test_connections_not_logged_in_are_capped_node_wide() -> None:
    g = guard(max_pending_connections=3)
    held = [g.admit(f"198.51.100.{n}") for n in range(3)]
    assert g.admit("198.51.100.9") == "too many connections not logged in on this node"
    assert g.admit_login("203.0.113.1") == "too many connections not logged in on this node"
    held[0].logged_in()  # logged in: no longer counted as pending
    assert isinstance(g.admit_login("203.0.113.1"), Admission)
    assert g.pending == 3
    for admission in held:
        admission.release()
        admission.release()  # once only
    assert g.pending == 1 and not g.connections


def test_a_lockout_closes_the_address_connections_still_logging_in() -> None:
    g = guard(guess_max_failures=3, guess_window=60, guess_lockout=60)
    closed = []
    ips = ("198.51.100.1", "198.51.100.1", "198.51.100.2", "198.51.100.1")
    a, b, other, done = (g.admit(ip) for ip in ips)
    for name, admission in (("a", a), ("b", b), ("other", other), ("done", done)):
        admission.watch(lambda name=name: closed.append(name))
    done.logged_in()  # logged in already: out of reach
    assert not g.failure("198.51.100.1") and not g.failure("198.51.100.1")
    assert g.failure("198.51.100.1")
    assert sorted(closed) == ["a", "b"]
    assert g.admit("198.51.100.1") == "locked out"
    assert g.locked_out == 1


def test_failures_are_not_forgotten_when_the_lock_is_set() -> None:
    """After the lockout, the next failure within the window locks again at once."""
    g = guard(guess_max_failures=2, guess_window=60, guess_lockout=0.05)
    g.failure("198.51.100.1")
    assert g.failure("198.51.100.1")
    time.sleep(0.06)
    assert isinstance(g.admit("198.51.100.1"), Admission)
    assert g.failure("198.51.100.1")  # one more is enough


def test_the_node_wide_guess_budget() -> None:
    """Addresses with failures need a token; fresh ones may always try (they cannot be
    told from users); guesses of a prefix take tokens, failed anonymous logins do not."""
    g = guard(guess_rate=2, guess_max_failures=1000)  # burst 4
    for n in range(4):
        assert g.may_guess(f"203.0.113.{n}")
        g.failure(f"203.0.113.{n}")
    assert not g.may_guess("203.0.113.0")  # it failed before, and no token is left
    for n in range(4, 30):
        assert g.may_guess(f"203.0.113.{n}")  # fresh: one each
        g.failure(f"203.0.113.{n}")
    assert not any(g.may_guess(f"203.0.113.{n}") for n in range(30))
    time.sleep(0.6)  # 2 tokens a second: one back (the debt was 26)
    assert not g.may_guess("203.0.113.0")
    fresh = guard(guess_rate=2)
    fresh.failure("198.51.100.1", guess=False)  # anonymous logins do not spend the budget
    assert fresh.may_guess("198.51.100.1") and fresh._tokens == 4
    assert guard(guess_rate=0).may_guess("203.0.113.9")  # 0: no node-wide bound


def test_recent_events_stay_bounded() -> None:
    events = RecentEvents(max_addresses=100)
    for n in range(1000):
        events.add(f"10.0.{n // 256}.{n % 256}", 600)
    assert len(events._times) <= 100
