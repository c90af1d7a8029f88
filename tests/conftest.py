"""Shared fixtures: relay backends, leak accounting."""

from __future__ import annotations

import sys

import pytest

from swiftftp import relay

# The field-like test device runs as threads of this process, beside the node's loop
# and the clients: a device thread woken by its data then waits for the GIL, up to
# the switch interval (5 ms by default) per hand-off, where a real device has its own
# CPU. 1 ms keeps that wait well under the node's 10 ms grace (outbox.GRACE).
sys.setswitchinterval(0.001)

#: Every relay test runs on both; a missing Rust extension is a failure, not a skip.
BACKENDS = ["rust", "python"]


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def backend(backend_name: str) -> relay.Backend:
    return relay.get_backend(backend_name)
