"""aio.run_all: every task's outcome is retrieved, whatever fails first."""

from __future__ import annotations

import asyncio
import gc

import pytest

from swiftftp import aio
from tests.helpers import run


async def _fail_soon(exc: BaseException, delay: float = 0.01) -> None:
    await asyncio.sleep(delay)
    raise exc


def test_two_failing_at_once_are_both_retrieved() -> None:
    """Both pumps of a relay fail in the same loop iteration (a client that dies mid-RETR:
    one direction's send gets EPIPE, the other's recv ECONNRESET): the first is raised,
    the second is retrieved, so asyncio never logs "Task exception was never retrieved"."""
    unretrieved: list[dict] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unretrieved.append(ctx))
        for _ in range(20):
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                await aio.run_all(_fail_soon(BrokenPipeError(32, "Broken pipe")),
                                  _fail_soon(ConnectionResetError(104, "Connection reset")))
        gc.collect()
        await asyncio.sleep(0.01)

    run(main(), 30)
    assert unretrieved == []


def test_the_others_are_cancelled_and_awaited() -> None:
    cancelled: list[bool] = []

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> None:
        with pytest.raises(ValueError):
            await aio.run_all(_fail_soon(ValueError("x")), forever(), forever())
        assert cancelled == [True, True]

    run(main(), 10)
