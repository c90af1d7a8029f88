"""Shared fixtures: relay backends, leak accounting."""

from __future__ import annotations

import pytest

from swiftftp import relay

#: Every relay test runs on both; a missing Rust extension is a failure, not a skip.
BACKENDS = ["rust", "python"]


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def backend(backend_name: str) -> relay.Backend:
    return relay.get_backend(backend_name)
