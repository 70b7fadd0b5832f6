"""A run cancelled from outside never leaves its own lease behind (Redis and PostgreSQL).

The window is between the server granting the claim and the code that releases it. The
tests cancel at many points: after a range of short delays around the claim's round trip,
and at every scheduling point (``anyio.lowlevel.checkpoint``) of the claim; each time the
same process must be able to claim the run again at once (the leases last 30 s, so a lease
left behind would lock it out).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from interpreters.stores._lease import new_holder
from stroma.errors import RunLocked
from stroma.runner import RunConfig, interpret
from tests.faults.kit import Acc, pipeline
from tests.services import drop_postgres_tables, drop_redis_prefix, unique

pytestmark = pytest.mark.anyio

DELAYS = [i * 0.0002 for i in range(40)]  # 0 to 8 ms, around a claim's round trip


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("sync-redis", marks=pytest.mark.redis),
                        pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Each leasing store (RedisStore, SyncRedisStore, PostgresStore) with a 30 s lease, on
    a fresh namespace of the shared server."""
    kind = str(request.param)
    if kind == "postgres":
        from interpreters.stores.postgres import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")
        made: Any = PostgresStore(dsn, table_prefix=unique("cx"), lease_seconds=30)
        try:
            yield made
        finally:
            await made.close()
            await drop_postgres_tables(dsn, made.tables)
        return
    from interpreters.stores.redis import RedisStore, SyncRedisStore

    url = request.getfixturevalue("redis_url")
    cls: Any = RedisStore if kind == "redis" else SyncRedisStore
    made = cls(url, key_prefix=unique("stroma-cx"), lease_ms=30_000)
    try:
        yield made
    finally:
        result = made.close()
        if result is not None:
            await result
        await drop_redis_prefix(url, made.key_prefix)


async def _free(store: Any, run_id: str) -> None:
    """The run can be claimed at once by another session of this process."""
    try:
        async with store.lease(run_id, new_holder()):
            pass
    except RunLocked as e:
        pytest.fail(f"a cancelled session left its lease on {run_id!r} behind: {e}")


async def test_cancelling_a_lease_claim_after_any_delay_leaves_no_lease(store: Any) -> None:
    """Cancelled after 0 to 8 ms (before, during or after the claim's round trip), the
    session never leaves its lease behind."""
    for n, delay in enumerate(DELAYS):
        run_id = f"cancel-{n}"
        with anyio.move_on_after(delay):
            async with store.lease(run_id, new_holder()):
                await anyio.sleep_forever()
        await _free(store, run_id)


async def test_cancelling_at_every_scheduling_point_of_a_claim_leaves_no_lease(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled at the k-th scheduling point of entering the lease, for every k until the
    lease is entered, the session never leaves its lease behind."""
    k = 0
    while True:
        run_id = f"point-{k}"
        entered = False
        async with anyio.create_task_group() as tg:
            async def enter(run_id: str = run_id) -> None:
                nonlocal entered
                async with store.lease(run_id, new_holder()):
                    entered = True
                    await anyio.sleep_forever()

            tg.start_soon(enter)
            for _ in range(k):  # let the claim run up to its k-th scheduling point
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
        await _free(store, run_id)
        if entered or k > 400:
            break
        k += 1
    assert entered, "the lease was never entered within 400 scheduling points"


async def test_a_run_cancelled_from_outside_can_be_resumed_at_once_by_this_process(
    store: Any,
) -> None:
    """``interpret`` cancelled at many moments (claiming, running, committing, releasing):
    the same process resumes the run at once, without RunLocked, to the right result."""
    for n, delay in enumerate([*DELAYS[::4], 0.01, 0.02, 0.05]):
        run_id = f"run-{n}"
        with anyio.move_on_after(delay):
            await interpret(pipeline(5), Acc(value=0), store=store,
                            config=RunConfig(run_id=run_id))
        result = await interpret(pipeline(5), Acc(value=0), store=store,
                                 config=RunConfig(run_id=run_id))
        assert result.final_state == Acc(value=5)


# ------------------------------------------------- a release the server does not answer


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("cancelled", [True, False])
async def test_a_cancelled_session_waits_for_its_release_only_briefly(
    anyio_backend: str, cancelled: bool, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A session cancelled from outside gives a release its server does not answer only
    ``RELEASE_WHEN_STOPPED_S`` (a second; 20 ms here), and leaves the lease to expire (it
    used to wait up to the lease time, 30 s by default); a session that ends on its own
    still waits for a slow release, up to the lease time."""
    from interpreters.stores import _lease

    monkeypatch.setattr(_lease, "RELEASE_WHEN_STOPPED_S", 0.02)
    released: list[str] = []

    async def claim(takeover: str | None) -> tuple[bool, str, int]:
        return True, "me", 1

    async def renew(token: int) -> tuple[bool, str]:
        return True, "me"

    async def release() -> None:
        released.append("asked")
        await anyio.sleep(0.06 if not cancelled else 30)  # a slow server, a stalled one
        released.append("done")

    lease = _lease.hold_lease(
        "the store", "r", new_holder(), 30.0, space="test", claim=claim, renew=renew,
        release=release, is_transient=lambda exc: False, fences={},
    )
    began = anyio.current_time()
    with anyio.move_on_after(0.01 if cancelled else 10) as scope:
        async with lease:
            if cancelled:
                await anyio.sleep_forever()
    took = anyio.current_time() - began
    assert scope.cancelled_caught is cancelled
    if cancelled:
        assert released == ["asked"] and took < 1.0
        assert "could not release the lease on run 'r'" in caplog.text
        assert "no answer within 0.02 s of the run being cancelled" in caplog.text
    else:
        assert released == ["asked", "done"] and took >= 0.06
        assert "could not release" not in caplog.text
