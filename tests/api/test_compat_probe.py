"""0.3.x code that the compatibility probe found refused or changed, pinned to run as the
earlier library ran it (API.md: input is validated against the node's input schema when
the node runs).

Every run goes through the real engine on asyncio and on trio (the ``anyio_backend``
fixture of tests/conftest.py); nothing sleeps.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from stroma import PlanError, RunStatus, StromaRunner, branch, loop, seq


class In(BaseModel):
    value: int


class Open(BaseModel):
    """An output schema that keeps the fields a node returns beyond its own."""

    model_config = ConfigDict(extra="allow")
    value: int


class Named(BaseModel):
    value: int
    name: str


class Derived(BaseModel):
    """An input schema whose ``name`` is derived from ``value`` when absent."""

    value: int
    name: str

    @model_validator(mode="before")
    @classmethod
    def _fill(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" not in data:
            return {**data, "name": f"n{data.get('value')}"}
        return data


class Labelled(BaseModel):
    """An input schema that also takes ``value`` as its ``label``."""

    label: str = Field(validation_alias=AliasChoices("label", "value"))


class OnlyName(BaseModel):
    name: str


class Text(BaseModel):
    value: str


def _pipeline(runner: StromaRunner, out: type[BaseModel], needs: type[BaseModel],
              first_in: type[BaseModel], returned: dict[str, Any]) -> list[Any]:
    @runner.node("make", input=first_in, output=out)
    async def make(state: BaseModel) -> dict[str, Any]:
        return returned

    @runner.node("use", input=needs, output=needs)
    async def use(state: BaseModel) -> dict[str, Any]:
        return state.model_dump()

    return [make, use]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("out", "needs", "first_in", "returned", "final"),
    [
        (Open, Named, In, {"value": 1, "name": "x"}, {"value": 1, "name": "x"}),
        (In, Derived, In, {"value": 1}, {"value": 1, "name": "n1"}),
        (Text, Labelled, Text, {"value": "x"}, {"label": "x"}),
    ],
    ids=["extra-allow-output", "before-validator-input", "validation-alias"],
)
async def test_a_pipeline_that_validates_at_run_time_is_not_refused_when_built(
    anyio_backend: str, out: type[BaseModel], needs: type[BaseModel],
    first_in: type[BaseModel], returned: dict[str, Any], final: dict[str, Any],
) -> None:
    """A required input field that the step before may well provide (an output schema with
    ``extra="allow"``, an input schema deriving it in a ``mode="before"`` validator, or
    taking it under a validation alias) is no PlanError: the run validates it and
    completes, as the earlier library's runs did."""
    runner = StromaRunner.quick()
    nodes = _pipeline(runner, out, needs, first_in, returned)
    result = await runner.run(nodes, first_in.model_validate(returned))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state.model_dump() == final


def test_a_field_surely_missing_is_still_refused_when_built() -> None:
    """The build-time check still refuses a required field nothing can provide: one the
    step before lacks, a validation alias it lacks under every name, and after a branch
    one that an arm lacks (an open arm beside it does not excuse that arm)."""
    runner = StromaRunner.quick()
    make, use = _pipeline(runner, In, Named, In, {"value": 1})
    with pytest.raises(PlanError, match=r"'use' needs 'name'"):
        seq(make, use)
    runner = StromaRunner.quick()
    make, use = _pipeline(runner, OnlyName, Labelled, In, {"name": "x"})
    with pytest.raises(PlanError, match=r"'use' needs 'label'"):
        seq(make, use)

    runner = StromaRunner.quick()

    @runner.node("open", input=In, output=Open)
    async def to_open(state: In) -> dict[str, Any]:
        return {"value": state.value, "name": "x"}

    @runner.node("closed", input=In, output=In)
    async def to_closed(state: In) -> dict[str, Any]:
        return {"value": state.value}

    @runner.node("use", input=Named, output=Named)
    async def use_named(state: Named) -> dict[str, Any]:
        return state.model_dump()

    @runner.node("open2", input=In, output=Open)
    async def to_open2(state: In) -> dict[str, Any]:
        return {"value": state.value, "name": "y"}

    with pytest.raises(PlanError, match=r"'use' needs 'name'"):
        seq(branch(lambda s: True, then=to_open, otherwise=to_closed), use_named)
    seq(branch(lambda s: True, then=to_open, otherwise=to_open2), use_named)


def test_a_loop_body_fed_by_an_open_output_is_not_refused() -> None:
    """A loop body whose output has ``extra="allow"`` may feed its own input's fields."""
    runner = StromaRunner.quick()

    @runner.node("step", input=Named, output=Open)
    async def step(state: Named) -> dict[str, Any]:
        return {"value": state.value + 1, "name": state.name}

    loop(step, until=lambda s: True, max_iterations=2)
    seq(loop(step, until=lambda s: True, max_iterations=2))
