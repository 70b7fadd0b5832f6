"""SyncRedisStore's lease works on asyncio and on trio (its Redis calls run in threads):
fenced writes, cancellation, a whole run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import redis
from pydantic import BaseModel

from interpreters.stores._lease import LeaseLost, new_holder
from interpreters.stores.redis import SyncRedisStore, _Keys
from stroma import NodeContract, stroma_node
from stroma.errors import RunLocked
from stroma.runner import RunConfig, interpret
from tests.services import unique

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The blocking store is not tied to asyncio."""
    return str(request.param)


class V(BaseModel):
    v: int


@pytest.fixture
def stores(redis_url: str) -> Iterator[tuple[Any, Any, Any]]:
    """Two SyncRedisStores (two workers) on one prefix, and a plain client beside them."""
    prefix = unique("stroma-sync-trio")
    a, b = SyncRedisStore(redis_url, key_prefix=prefix), SyncRedisStore(redis_url,
                                                                        key_prefix=prefix)
    raw = redis.Redis.from_url(redis_url)
    try:
        yield a, b, raw
    finally:
        a.close()
        b.close()
        for key in raw.scan_iter(match=prefix.encode() + b":*"):
            raw.delete(key)
        raw.close()


async def test_a_stale_sync_holder_is_fenced_off(stores: tuple[Any, Any, Any]) -> None:
    """After A's lease expired and B claimed the run, A's append is refused and B's log is
    what B wrote."""
    a, b, raw = stores
    async with a.lease("r", "worker-a"):
        a.append_log("r", ['{"i":0}'])
        raw.delete(_Keys(a.key_prefix.encode(), b"r").lease)
        async with b.lease("r", "worker-b"):
            b.append_log("r", ['{"i":1}'])
            with pytest.raises(LeaseLost) as info:
                a.append_log("r", ['{"i":1}'])
            assert info.value.holder == "worker-b" and info.value.stale_holder == "worker-a"
    assert raw.lrange(_Keys(a.key_prefix.encode(), b"r").log, 0, -1) == [b'{"i":0}', b'{"i":1}']


async def test_cancelled_sync_claims_leave_no_lease(stores: tuple[Any, Any, Any]) -> None:
    """Cancelled after 0 to 6 ms, a session of the blocking store never leaves its lease."""
    a, _, _ = stores
    for n in range(30):
        with anyio.move_on_after(n * 0.0002):
            async with a.lease(f"c{n}", new_holder()):
                await anyio.sleep_forever()
        try:
            async with a.lease(f"c{n}", new_holder()):
                pass
        except RunLocked as e:
            pytest.fail(f"a cancelled session left its lease behind: {e}")


async def test_a_run_on_the_sync_store(stores: tuple[Any, Any, Any]) -> None:
    """A two-node run through interpret completes, and a second worker is locked out while
    it runs."""
    a, b, _ = stores
    gate, entered = anyio.Event(), anyio.Event()

    async def slow(s: V) -> dict[str, int]:
        entered.set()
        await gate.wait()
        return {"v": s.v + 1}

    async def fast(s: V) -> dict[str, int]:
        return {"v": s.v * 10}

    nodes = [stroma_node(i, NodeContract(node_id=i, input_schema=V, output_schema=V))(f)
             for i, f in (("slow", slow), ("fast", fast))]
    results: list[Any] = []
    async with anyio.create_task_group() as tg:
        async def run() -> None:
            results.append(await interpret(nodes, V(v=1), store=a,
                                           config=RunConfig(run_id="run")))

        tg.start_soon(run)
        await entered.wait()
        with pytest.raises(RunLocked):
            await interpret(nodes, V(v=1), store=b, config=RunConfig(run_id="run"))
        gate.set()
    assert results[0].final_state == V(v=20)
