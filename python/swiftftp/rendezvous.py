"""One client waiting for its device to come to a fresh port (no I/O).

The node tells the device ``control_connection_waiting`` with the port (through
its command session's :class:`~swiftftp.outbox.Outbox`), and accepts on the port
until the device has logged in there. :class:`Rendezvous` holds what the accept
loop in ``clients.py`` decides by:

* only the device's own address is heard (as the passive listeners hear only
  the device's clients); anyone else is closed at once, and at most
  :data:`MAX_CANDIDATES` connections from that address log in at the same time,
  each within ``timeouts.device_login``: a stranger never delays the device;
* how it ended: ``taken`` (the device logged in), ``timeout`` (the device was
  told and did not come), or ``abandoned`` (the client left, the node stops);
  and what that means for the device: :data:`MAX_FAILURES` timeouts in a row
  close its command session, so that a device that no longer does its part
  reconnects rather than keep its users waiting;
* how long the device took to react (:meth:`reaction`), the evidence behind the
  grace after the login's ``{}`` (``outbox.rendezvous_grace``).
"""

from __future__ import annotations

#: Connections from the device's address that may log in on one rendezvous port at once.
MAX_CANDIDATES = 8
#: Rendezvous in a row a device may let time out (told, and not come) before its
#: command session is closed.
MAX_FAILURES = 3


class Rendezvous:
    """A ``control_connection_waiting`` and its port, from queued to over."""

    __slots__ = ("port", "device_ip", "written", "written_at", "done", "candidates", "outcome")

    def __init__(self, port: int, device_ip: str) -> None:
        self.port = port
        self.device_ip = device_ip
        self.written = False
        #: Loop time the message was written to the device.
        self.written_at = 0.0
        #: Over: taken, or ended without the device.
        self.done = False
        self.candidates = 0
        self.outcome = ""

    def admit(self, peer_ip: str) -> bool:
        """May this connection to the port try to log in? (Count it if so.)"""
        if peer_ip != self.device_ip or self.candidates >= MAX_CANDIDATES:
            return False
        self.candidates += 1
        return True

    def candidate_left(self) -> None:
        self.candidates -= 1

    def reaction(self, now: float) -> float | None:
        """Seconds from writing the message to ``now`` (a connection from the device)."""
        return now - self.written_at if self.written else None

    def over(self, outcome: str, failures: int) -> int:
        """End it with ``outcome`` (taken, timeout, abandoned); the device's rendezvous
        failures in a row from ``failures``: a timeout counts only if the device was
        told (the ones waiting behind it failed because of that one)."""
        self.done = True
        self.outcome = outcome
        if outcome == "taken":
            return 0
        if outcome == "timeout" and self.written:
            return failures + 1
        return failures
