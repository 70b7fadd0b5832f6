"""A FileStore run of map_each within map_each (each item's body maps again over a list it
makes), in a subprocess that the nested crash test SIGKILLs.

Usage: python -m tests.resume.nested_worker STORE_DIR RUN_ID SIDE_EFFECTS_FILE
Each node appends its call's idempotency key (the same for every re-run of one logical
call) to SIDE_EFFECTS_FILE when it runs; on completion the worker prints the status and
the final state's JSON.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
from pydantic import BaseModel

from interpreters.stores.file import FileStore
from stroma import NodeContract, map_each, seq, stroma_node
from stroma.runner import RunConfig, interpret

ITEMS = [1, 2, 3, 4]


class Item(BaseModel):
    item: int


class Items(BaseModel):
    items: list[int]
    outs: list[Item] = []


def build(side_effects: str) -> Any:
    def node(name: str, schema: type[BaseModel], fn: Any,
             output: type[BaseModel] | None = None) -> Any:
        async def call(state: Any, ctx: dict[str, Any]) -> dict[str, Any]:
            with open(side_effects, "a", encoding="utf-8") as f:
                f.write(ctx["_stroma_idempotency_key"] + "\n")
                f.flush()
            await anyio.sleep(0.002)
            return fn(state)

        contract = NodeContract(node_id=name, input_schema=schema,
                                output_schema=output or schema)
        return stroma_node(name, contract)(call)

    inner = seq(node("x", Item, lambda s: {"item": s.item * 10}),
                node("y", Item, lambda s: {"item": s.item + 1}))
    expand = node("expand", Item, lambda s: {"items": [s.item, s.item + 1, s.item + 2]},
                  output=Items)
    body = seq(expand,
               map_each(inner, over="items", into="outs", input=Items, max_concurrency=1),
               node("sum", Items, lambda s: {"item": sum(o.item for o in s.outs)},
                    output=Item))
    return seq(node("start", Items, lambda s: {"items": s.items}),
               map_each(body, over="items", into="outs", input=Items, max_concurrency=1))


async def main(store_dir: str, run_id: str, side_effects: str) -> None:
    result = await interpret(build(side_effects), Items(items=ITEMS),
                             store=FileStore(store_dir), config=RunConfig(run_id=run_id))
    print(result.status, result.final_state.model_dump_json(), flush=True)


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:4])
    sys.stdout.flush()
    os._exit(0)
