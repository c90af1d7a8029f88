"""Token bucket objects of both backends, without sockets: defaults, validation,
changes of rate; the Rust bucket's token accounting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swiftftp import relay


def test_defaults_and_properties(backend: relay.Backend) -> None:
    b = backend.bucket()
    assert (b.rate, b.burst) == (0, 16384)
    b = backend.bucket(1_000_000)
    assert (b.rate, b.burst) == (1_000_000, 50_000)
    b = backend.bucket(1_000_000, 8192)
    assert (b.rate, b.burst) == (1_000_000, 8192)


def test_set_rate_replaces_rate_and_burst(backend: relay.Backend) -> None:
    b = backend.bucket(1000, 4096)
    b.set_rate(2_000_000)
    assert (b.rate, b.burst) == (2_000_000, relay.default_burst(2_000_000))
    b.set_rate(0, 0)
    assert (b.rate, b.burst) == (0, 16384)


@pytest.mark.parametrize(("rate", "burst"), [(-1, None), (1000, -5)])
def test_negative_limits_are_refused(backend: relay.Backend, rate: float, burst: float | None) -> None:
    with pytest.raises(ValueError):
        backend.bucket(rate, burst)
    b = backend.bucket(1000)
    with pytest.raises(ValueError):
        b.set_rate(rate, burst)
    assert b.rate == 1000


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False))
def test_default_burst_is_the_same_in_rust_and_python(rate: float) -> None:
    if "rust" not in relay.available():
        pytest.skip("extension not built")
    from swiftftp import _splice

    assert _splice.default_burst(rate) == relay.default_burst(rate)
    assert _splice.Bucket(rate).burst == relay.default_burst(rate)


def test_rust_bucket_starts_full_and_refills() -> None:
    from swiftftp import _splice

    b = _splice.Bucket(1_000_000, 100_000)
    assert b.tokens == 100_000
    b.set_rate(1_000_000, 10_000)
    assert b.tokens == 10_000, "capped to the new burst"
    assert "rate=1000000" in repr(b)


def test_rust_bucket_refuses_nan() -> None:
    from swiftftp import _splice

    with pytest.raises(ValueError):
        _splice.Bucket(float("nan"))
    with pytest.raises(ValueError):
        _splice.Bucket(1000, float("inf"))
