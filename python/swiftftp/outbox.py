"""What may be written to a device, and when (no I/O): the pacing rules.

The deployed device reads with one ``read()`` of at most 2048 bytes and parses
one JSON object from it; whatever else that read returned is lost. On its
command session, after ``control_connection_waiting`` the reading thread itself
connects to the named port and logs in there before it reads again, so
anything that arrives meanwhile piles up (docs/protocol.md, field facts). Hence,
towards such a device, a message is written only once the device has provably
read the one before:

* after ``control_connection_waiting``: once the device has logged in on that
  port, or that rendezvous has ended (:meth:`Outbox.release`);
* after any other message (or a final ``{}`` that raw bytes follow): once the
  device's TCP has acknowledged it and ``grace`` seconds have passed since it
  was written. A reader blocked in ``read()`` takes a message the moment it
  arrives; the next one reaches the device no sooner than the previous one's
  acknowledgement came back plus one way: the round trip itself keeps them
  apart on a real link, and ``grace`` only matters where the round trip is
  shorter than the reader's wake-up (loopback, a LAN). See :data:`GRACE`.

Replies go before the unsolicited messages waiting, but not past a message the
device has not read: the deployed device sends its requests from other threads
than its reader (SwiFTP's ``sendCmdSocketRequest``), so a request is no proof
that the reader has read anything.

A device that says in its login that it decodes a byte stream (``"json_stream":
true``, our agent) gets everything at once: :class:`Outbox` with ``paced=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .rendezvous import Rendezvous

#: Default spacing between a message and the next when the round trip is shorter:
#: the time a reader blocked in ``read()`` may need to wake up and take the first
#: alone. benches/wakeup.py, pairs of messages on loopback to a thread blocked in
#: recv(2048), 3000 pairs per gap, two CPU-spinning processes on this 2-core
#: machine: read together at 1 ms 5, at 2 ms 0, at 5 ms 1, at 10 and 20 ms 0
#: (at 0 ms 2750); with a thread keeping the reader's GIL busy too (the test
#: device beside the node): at 2 ms 45, at 5, 10 and 20 ms 0. 10 ms it is, twice
#: the last gap seen to fail. On links whose round trip exceeds it, the
#: acknowledgement's own delay covers it and nothing is added.
GRACE = 0.01

#: Least spacing after the ``{}`` of a rendezvous login (see :func:`rendezvous_grace`):
#: in benches/wakeup.py, readers already blocked in recv read 2 pairs together in
#: 10,500 at 5 ms with two CPU-spinning processes (none at 10 ms), 5 in 3,000 at 1 ms.
RENDEZVOUS_FLOOR = 0.005


def rendezvous_grace(reaction: float, cap: float) -> float:
    """The spacing after the ``{}`` that ends a rendezvous login, from evidence.

    The deployed device's command thread reads ``control_connection_waiting``,
    connects to the port, logs in and reads the ``{}`` itself: ``reaction``, the
    time from writing the message to that connection arriving, is how long that
    very thread took to wake up and act just now (plus the round trip, which the
    acknowledgement covers anyway). Twice that, at least :data:`RENDEZVOUS_FLOOR`,
    at most ``cap`` (``device_grace``).
    """
    return min(cap, max(RENDEZVOUS_FLOOR, 2 * reaction))


#: Polling of the acknowledgement (SIOCOUTQ): first after this, doubling to _POLL_MAX.
_POLL_START = 0.0005
_POLL_MAX = 0.02


class Outbox:
    """The messages waiting for one device connection, and the pacing rules above.

    Feed it with :meth:`reply` and :meth:`notify`, tell it :meth:`release` when the
    device logged in on a rendezvous port or the rendezvous ended; :meth:`writable`
    says what to write now and when to ask again.
    """

    __slots__ = ("paced", "grace", "_replies", "_notices", "_rendezvous", "_sent_at", "_poll")

    def __init__(self, paced: bool, grace: float = GRACE) -> None:
        self.paced = paced
        self.grace = grace
        # lists, not deques: they hold a message or two, and an empty deque costs 760
        # bytes against a list's 56, for each of thousands of idle devices
        self._replies: list[bytes] = []
        self._notices: list[tuple[bytes, Rendezvous | None]] = []
        #: The control_connection_waiting written, until released.
        self._rendezvous: Rendezvous | None = None
        #: When the last other message was written, until it is known to be read.
        self._sent_at: float | None = None
        self._poll = _POLL_START

    def __len__(self) -> int:
        """Messages not written yet."""
        return len(self._replies) + len(self._notices)

    def reply(self, data: bytes) -> None:
        """Queue the reply to a device's request."""
        self._replies.append(data)

    def notify(self, data: bytes, rendezvous: Rendezvous | None = None) -> None:
        """Queue an unsolicited message; with ``rendezvous``, its control_connection_waiting."""
        self._notices.append((data, rendezvous))

    def release(self, rendezvous: Rendezvous) -> None:
        """The device logged in on that rendezvous port, or the rendezvous ended: a
        message not written yet is dropped; one written no longer holds the rest back."""
        if self._rendezvous is rendezvous:
            self._rendezvous = None
            self._sent_at = None  # it logged in there (or gave up): nothing else to wait for
        elif not rendezvous.written:
            self._notices = [item for item in self._notices if item[1] is not rendezvous]

    def wrote(self, now: float) -> None:
        """Something other than a queued message was written (a final ``{}`` before
        raw bytes): the same rule holds for what follows."""
        if self.paced:
            self._sent_at = now
            self._poll = _POLL_START

    def blocked_since(self) -> float | None:
        """When the message the device has not acknowledged yet was written."""
        return self._sent_at

    def writable(
        self, now: float, unacked: Callable[[], int]
    ) -> tuple[list[tuple[bytes, Rendezvous | None]], float | None]:
        """The messages to write now, in order, and when to call again if something
        must wait (None: nothing waits, or only for :meth:`release`).
        ``unacked()`` gives the bytes written and not yet acknowledged."""
        if not self.paced:
            out = [(data, None) for data in self._replies]
            self._replies.clear()
            out += self._notices
            self._notices.clear()
            for _, rendezvous in out:
                if rendezvous is not None:
                    rendezvous.written, rendezvous.written_at = True, now
            return out, None
        if not self._replies and not self._notices:
            return [], None
        wake = self.ready(now, unacked)
        if wake is not None:
            return [], wake
        if self._rendezvous is not None:
            return [], None  # until release()
        if self._replies:
            item: tuple[bytes, Rendezvous | None] = (self._replies.pop(0), None)
        else:
            item = self._notices.pop(0)
        rendezvous = item[1]
        if rendezvous is not None:
            rendezvous.written, rendezvous.written_at = True, now
            self._rendezvous = rendezvous
        self._sent_at = now
        self._poll = _POLL_START
        return [item], (now + self.grace if len(self) and rendezvous is None else None)

    def ready(self, now: float, unacked: Callable[[], int]) -> float | None:
        """None once the device has read what was written (as far as the clock and
        the acknowledgement tell); else when to look again."""
        if self._sent_at is None:
            return None
        if now < self._sent_at + self.grace:
            return self._sent_at + self.grace
        if unacked():
            wake = now + self._poll
            self._poll = min(self._poll * 2, _POLL_MAX)
            return wake
        self._sent_at = None
        return None
