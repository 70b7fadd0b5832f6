"""A 30-node pipeline on a FileStore, run in a subprocess that the crash test SIGKILLs.

Usage: python -m tests.resume.worker STORE_DIR RUN_ID SIDE_EFFECTS_FILE
Each node appends its id to SIDE_EFFECTS_FILE (flushed to the OS) when it runs, so the
test can tell which nodes ran and how often. On completion it prints the final value.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
from pydantic import BaseModel

from interpreters.stores.file import FileStore
from stroma import NodeContract, stroma_node
from stroma.runner import RunConfig, interpret

N = 30


class Acc(BaseModel):
    value: int
    trail: list[str]


def build(side_effects: str) -> list[Any]:
    contract_cache: dict[int, NodeContract] = {}
    nodes = []
    for i in range(N):
        node_id = f"step{i:02d}"
        contract_cache[i] = NodeContract(node_id=node_id, input_schema=Acc, output_schema=Acc)

        def make(node_id: str) -> Any:
            async def step(state: Acc) -> dict[str, Any]:
                with open(side_effects, "a", encoding="utf-8") as f:
                    f.write(node_id + "\n")
                    f.flush()
                await anyio.sleep(0.002)
                return {"value": state.value + 1, "trail": [*state.trail, node_id]}

            return step

        nodes.append(stroma_node(node_id, contract_cache[i])(make(node_id)))
    return nodes


async def main(store_dir: str, run_id: str, side_effects: str) -> None:
    result = await interpret(
        build(side_effects), Acc(value=0, trail=[]), store=FileStore(store_dir),
        config=RunConfig(run_id=run_id),
    )
    print(f"{result.status} {result.final_state.value}", flush=True)  # type: ignore[attr-defined]


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:4])
    sys.stdout.flush()
    os._exit(0)
