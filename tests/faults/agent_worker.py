"""A worker process for the agent crash tests: a loop plan, or a loop plan that waits for an
approval, on a FileStore, RedisStore or PostgresStore; the test SIGKILLs it.

Usage: python -m tests.faults.agent_worker MODE KIND TARGET NAME RUN_ID FOLDER LABEL BACKEND
       [PAYLOAD ...]

MODE is ``loop`` (8 iterations of think, act), ``wait`` (3 iterations, then
``await_input("approval")``, then publish) or ``send`` (``send_input`` each PAYLOAD, a JSON
text, in turn, with the digest of the run's wait). KIND is ``file`` (TARGET the store's
folder), ``redis`` (TARGET a URL, NAME the key prefix) or ``postgres`` (TARGET a DSN, NAME the
table prefix). BACKEND is the anyio backend (``asyncio``, or ``trio`` for a FileStore).

Each node call appends ``<node> <iteration> <idempotency key>`` to ``FOLDER/calls.LABEL``
(flushed to the OS before the node goes on). While ``FOLDER/block`` exists and holds
``<node> <iteration>``, that call writes ``FOLDER/blocked`` and then waits forever (the test
kills the process there). A worker that finds the run leased (by a process that was
killed) retries for up to 30 s. It prints ``DONE <status> <final state JSON>``, ``SENT <key>``,
``REFUSED <message>`` or ``ERROR <exception class> <message>``, one line each.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
from pydantic import BaseModel

from stroma import InputRefused, NodeContract, await_input, loop, send_input, stroma_node
from stroma.errors import RunLocked
from stroma.inputs import pending_wait
from stroma.plan import seq
from stroma.runner import RunConfig, interpret

LOOP_ITERATIONS = 8
WAIT_ITERATIONS = 3
LEASE_MS = 1500


class Approval(BaseModel):
    approved: bool
    by: str


class Agent(BaseModel):
    n: int = 0
    notes: list[str] = []
    approval: Approval | None = None


def _node(node_id: str, folder: str, label: str, advance: bool) -> Any:
    """A node that logs its call; ``act`` (``advance``) ends the iteration (``n`` + 1)."""

    async def step(state: Agent, ctx: dict[str, Any]) -> dict[str, Any]:
        key = ctx["_stroma_idempotency_key"]  # read first: the context is shared
        iteration = state.n + 1
        with open(os.path.join(folder, f"calls.{label}"), "a", encoding="utf-8") as f:
            f.write(f"{node_id} {iteration} {key}\n")
            f.flush()
        block = os.path.join(folder, "block")
        try:
            with open(block, encoding="utf-8") as f:
                blocked = f.read().split() == [node_id, str(iteration)]
        except FileNotFoundError:
            blocked = False
        if blocked:
            with open(os.path.join(folder, "blocked"), "w", encoding="utf-8") as f:
                f.write(f"{os.getpid()}\n")
            await anyio.sleep_forever()  # killed here
        notes = [*state.notes, f"{node_id}{iteration}"]
        return {**state.model_dump(), "n": state.n + (1 if advance else 0), "notes": notes}

    contract = NodeContract(node_id=node_id, input_schema=Agent, output_schema=Agent)
    return stroma_node(node_id, contract)(step)


def build(mode: str, folder: str, label: str) -> Any:
    """The loop plan (``loop``) or the loop plan with an approval at the end (``wait``)."""
    iterations = LOOP_ITERATIONS if mode == "loop" else WAIT_ITERATIONS
    agent = loop(
        seq(_node("think", folder, label, False), _node("act", folder, label, True)),
        until=lambda s: s.n >= iterations, max_iterations=iterations + 2, name="agent",
    )
    if mode == "loop":
        return agent
    return seq(agent, await_input("approval", Approval), _node("publish", folder, label, False))


def make_store(kind: str, target: str, name: str) -> Any:
    if kind == "file":
        from interpreters.stores.file import FileStore

        return FileStore(target)
    if kind == "redis":
        from interpreters.stores.redis import RedisStore

        return RedisStore(target, key_prefix=name, lease_ms=LEASE_MS)
    from interpreters.stores.postgres import PostgresStore

    return PostgresStore(target, table_prefix=name, lease_seconds=LEASE_MS / 1000)


async def _run(mode: str, store: Any, run_id: str, folder: str, label: str) -> None:
    deadline = anyio.current_time() + 30
    while True:
        try:
            result = await interpret(build(mode, folder, label), Agent(), store=store,
                                     config=RunConfig(run_id=run_id))
            break
        except RunLocked as e:
            # The lease of a killed worker: wait for it to expire (a LeaseLost is no wait).
            if type(e) is not RunLocked or anyio.current_time() > deadline:
                raise
            await anyio.sleep(0.05)
    print(f"DONE {result.status} {result.final_state.model_dump_json()}", flush=True)


async def _send(store: Any, run_id: str, payloads: list[str]) -> None:
    log = await store.read_log(run_id)
    [wait] = pending_wait(log)
    for payload in payloads:
        try:
            key = await send_input(store, run_id, "approval", payload, digest=wait.digest)
        except InputRefused as e:
            print(f"REFUSED {e}".replace("\n", " "), flush=True)
        else:
            print(f"SENT {key}", flush=True)


async def main(mode: str, kind: str, target: str, name: str, run_id: str, folder: str,
               label: str, *payloads: str) -> None:
    store = make_store(kind, target, name)
    try:
        if mode == "send":
            await _send(store, run_id, list(payloads))
        else:
            await _run(mode, store, run_id, folder, label)
    except Exception as e:  # the test reads what ended the run
        print(f"ERROR {type(e).__name__} {e}".replace("\n", " "), flush=True)
    finally:
        if hasattr(store, "close"):
            await store.close()


if __name__ == "__main__":
    argv = sys.argv[1:]
    anyio.run(main, *argv[:7], *argv[8:], backend=argv[7])
