"""A run prices its calls from the model prices it began with, which its log's header
keeps: a replay, a resume and ``show`` price them the same, whatever KNOWN_MODELS says by
then (a stroma upgrade that changes a price, a model the pipeline added at run time that
another process does not know). A log written before prices were kept is priced from
KNOWN_MODELS, as it was."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from interpreters.stores.file import FileStore
from stroma import NodeContract, replay, seq, stroma_node
from stroma.cost import KNOWN_MODELS, estimate_cost_usd
from stroma.log import EffectLog
from stroma.runner import RunConfig, interpret
from stroma.timeline import timeline

pytestmark = pytest.mark.anyio


class S(BaseModel):
    value: int


@pytest.fixture
def prices() -> Iterator[dict[str, tuple[float, float]]]:
    """KNOWN_MODELS, put back as it was after the test."""
    before = dict(KNOWN_MODELS)
    yield KNOWN_MODELS
    KNOWN_MODELS.clear()
    KNOWN_MODELS.update(before)


def asking(model: str) -> object:
    async def ask(state: S) -> tuple[dict[str, int], int, int, str]:
        return {"value": state.value + 1}, 1_000, 200, model

    contract = NodeContract(node_id="ask", input_schema=S, output_schema=S)
    return stroma_node("ask", contract)(ask)


async def test_a_price_change_after_the_run_changes_nothing_of_it(
        tmp_path: Path, prices: dict[str, tuple[float, float]]) -> None:
    plan = seq(asking("gpt-4o"))
    store = FileStore(tmp_path)
    live = await interpret(plan, S(value=1), store=store, config=RunConfig(run_id="r"))
    paid = estimate_cost_usd("gpt-4o", 1_000, 200)
    assert live.total_cost_usd == pytest.approx(paid)

    prices["gpt-4o"] = (prices["gpt-4o"][0] * 0.8, prices["gpt-4o"][1])  # a price cut

    assert await replay(plan, live.log) == live  # type: ignore[arg-type]
    again = await interpret(plan, S(value=1), store=store, config=RunConfig(run_id="r"))
    assert again == live  # the finished run, returned (it raised a NondeterminismError)
    assert timeline(live.log).tokens == 1_200  # type: ignore[arg-type]
    assert timeline(live.log).rows[0].bars[0].usage.cost_usd == pytest.approx(  # type: ignore[arg-type]
        paid)


async def test_a_model_added_at_run_time_is_priced_by_a_reader_that_lacks_it(
        prices: dict[str, tuple[float, float]]) -> None:
    prices["house-model"] = (2.0, 8.0)
    plan = seq(asking("house-model"))
    live = await interpret(plan, S(value=1))
    text = live.log.to_jsonl()  # type: ignore[union-attr]
    del prices["house-model"]  # (another process: the CLI's, say)

    log = EffectLog.from_jsonl(text)
    assert (await replay(plan, log)).total_cost_usd == pytest.approx(live.total_cost_usd)
    [row] = timeline(log).rows
    assert row.bars[0].usage.cost_usd == pytest.approx((1_000 * 2.0 + 200 * 8.0) / 1e6)


async def test_a_log_that_keeps_no_prices_is_priced_from_known_models(
        prices: dict[str, tuple[float, float]]) -> None:
    plan = seq(asking("gpt-4o"))
    live = await interpret(plan, S(value=1))
    lines = live.log.to_jsonl().splitlines()  # type: ignore[union-attr]
    header = json.loads(lines[0])
    del header["config"]["prices"]
    older = EffectLog.from_jsonl("\n".join([json.dumps(header), *lines[1:]]) + "\n")

    assert (await replay(plan, older)).total_cost_usd == pytest.approx(live.total_cost_usd)
    prices["gpt-4o"] = (0.0, 0.0)
    assert timeline(older).rows[0].bars[0].usage.cost_usd == 0.0
