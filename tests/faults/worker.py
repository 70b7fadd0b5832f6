"""A worker process for the fault tests: a 10-node run on a RedisStore or PostgresStore.

Usage: python -m tests.faults.worker KIND TARGET NAME RUN_ID LEASE_MS EFFECTS BLOCK_AT WAIT

KIND is ``redis`` (TARGET a URL, NAME the key prefix) or ``postgres`` (TARGET a DSN, NAME the
table prefix). Each node appends its id to EFFECTS (flushed) when it starts; node BLOCK_AT
(``-`` for none) blocks its process for 0.4 s (a CPU-bound node: the event loop does not
run). With WAIT ``wait``, a worker that finds the run leased when it starts retries for up to
30 s (``once``: it does not). It prints one line: ``DONE
<status> <value>`` when its run ends, or ``ERROR <exception class> <message>``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio
from pydantic import BaseModel

from stroma import NodeContract, stroma_node
from stroma.errors import RunLocked
from stroma.runner import RunConfig, interpret

N = 10


class Acc(BaseModel):
    value: int


def build(effects: str, block_at: str) -> list[Any]:
    nodes = []
    for i in range(N):
        node_id = f"step{i:02d}"
        contract = NodeContract(node_id=node_id, input_schema=Acc, output_schema=Acc)

        def make(node_id: str) -> Any:
            async def step(state: Acc) -> dict[str, Any]:
                with open(effects, "a", encoding="utf-8") as f:
                    f.write(node_id + "\n")
                    f.flush()
                if node_id == block_at:
                    time.sleep(0.4)  # blocks the loop: a pause here stops renewals too
                else:
                    await anyio.sleep(0.02)
                return {"value": state.value + 1}

            return step

        nodes.append(stroma_node(node_id, contract)(make(node_id)))
    return nodes


def make_store(kind: str, target: str, name: str, lease_ms: int) -> Any:
    if kind == "redis":
        from interpreters.stores.redis import RedisStore

        return RedisStore(target, key_prefix=name, lease_ms=lease_ms)
    from interpreters.stores.postgres import PostgresStore

    return PostgresStore(target, table_prefix=name, lease_seconds=lease_ms / 1000)


async def main(kind: str, target: str, name: str, run_id: str, lease_ms: str, effects: str,
               block_at: str, wait: str) -> None:
    store = make_store(kind, target, name, int(lease_ms))
    try:
        deadline = anyio.current_time() + 30
        while True:
            try:
                result = await interpret(build(effects, block_at), Acc(value=0), store=store,
                                         config=RunConfig(run_id=run_id))
                break
            except RunLocked as e:
                if wait != "wait" or type(e) is not RunLocked or anyio.current_time() > deadline:
                    raise
                await anyio.sleep(0.05)  # another worker holds the run: wait for it
        print(f"DONE {result.status} {result.final_state.value}", flush=True)  # type: ignore[attr-defined]
    except BaseException as e:  # the test reads what ended the run
        print(f"ERROR {type(e).__name__} {e}".replace("\n", " "), flush=True)
    finally:
        await store.close()


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:9])
