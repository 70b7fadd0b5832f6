"""The state a resumed or replayed run goes on with is the state the live run went on with.

A checkpoint and the log keep a state as its JSON; a resume and a replay read it back.
For a schema whose JSON may not read back as itself (``reads_back``: validators,
serializers, ``Any`` fields...) the live run goes on with the state as its JSON reads
back, so all three agree; an output whose JSON reads back as another state (a validator
that appends each time it runs) fails its attempt TERMINAL instead of drifting on every
resume. Fields are read by name and by alias, so an aliased field survives a checkpoint.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

from interpreters.stores.file import FileStore
from stroma import FailureClass, NodeContract, RunStatus, replay, seq, stroma_node
from stroma.errors import StateNotSerializable
from stroma.runner import RunConfig, interpret
from stroma.schemas import reads_back

pytestmark = pytest.mark.anyio


def node(node_id: str, schema: type[BaseModel], fn: Any, seen: list[Any],
         inp: type[BaseModel] | None = None) -> Any:
    async def call(state: Any) -> Any:
        seen.append((node_id, state))
        return fn(state)

    call.__name__ = node_id
    contract = NodeContract(node_id=node_id, input_schema=inp or schema, output_schema=schema)
    return stroma_node(node_id, contract)(call)


class Aliased(BaseModel):
    user_name: str = Field(default="", alias="userName")  # (no populate_by_name)
    n: int = 0


class Loose(BaseModel):
    meta: dict[str, Any] = {}
    n: int = 0


class Shouting(BaseModel):
    name: str = "x"

    @field_validator("name")
    @classmethod
    def bang(cls, value: str) -> str:
        return value + "!"  # applies again each time the state is read


class Strict(BaseModel):
    model_config = ConfigDict(strict=True)
    point: tuple[int, int] = (0, 0)


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    net: int = 1

    @computed_field  # type: ignore[prop-decorator]
    @property
    def gross(self) -> int:
        return self.net * 2


async def test_an_aliased_field_survives_the_checkpoint_resume_and_replay(
        tmp_path: Path) -> None:
    seen: list[Any] = []
    a = node("a", Aliased, lambda s: {"userName": "ann", "n": 1}, seen)
    b = node("b", Aliased, lambda s: {"userName": s.user_name, "n": s.n + 1}, seen)
    plan = seq(a, b)
    store = FileStore(tmp_path / "runs")

    live = await interpret(plan, Aliased(), store=store, config=RunConfig(run_id="r"))
    assert live.final_state == Aliased(userName="ann", n=2)
    assert await replay(plan, live.log) == live  # type: ignore[arg-type]
    assert await store.load("r", "a") == Aliased(userName="ann", n=1)
    seen.clear()
    resumed = await interpret(plan, Aliased(), store=store,
                              config=RunConfig(run_id="r2", resume_from="b"))
    assert resumed.status is RunStatus.PARTIAL  # (another run id: nothing to resume)
    again = await interpret(plan, Aliased(), store=store,
                            config=RunConfig(run_id="r", resume_from="b"))
    assert again.status is RunStatus.RESUMED
    assert seen == [("b", Aliased(userName="ann", n=1))]
    assert again.final_state == live.final_state


async def test_a_live_run_goes_on_with_an_any_field_as_its_json_reads_back() -> None:
    """A tuple in an ``Any`` field is a list once read back from JSON, and a datetime is
    text: the next node sees what it would see after a resume, and the replay agrees."""
    seen: list[Any] = []
    at = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    a = node("a", Loose, lambda s: {"meta": {"pair": (1, 2), "at": at}, "n": 1}, seen)
    b = node("b", Loose, lambda s: {"meta": s.meta, "n": s.n + 1}, seen)
    plan = seq(a, b)

    live = await interpret(plan, Loose())

    assert live.status is RunStatus.COMPLETED
    assert seen[1] == ("b", Loose(meta={"pair": [1, 2], "at": "2026-01-01T00:00:00Z"}, n=1))
    assert await replay(plan, live.log) == live  # type: ignore[arg-type]


async def test_an_output_that_reads_back_as_another_state_fails_terminal() -> None:
    """A validator that appends each time it runs would give 'ann!!' to a resume and
    'ann!!!' to the next: the attempt fails TERMINAL naming the field, and the failed run
    replays."""
    seen: list[Any] = []
    a = node("a", Shouting, lambda s: {"name": "ann"}, seen, inp=Loose)
    plan = seq(a)

    result = await interpret(plan, Loose())

    assert result.status is RunStatus.FAILED
    (failed,) = result.trace.failures()
    assert failed.failure is FailureClass.TERMINAL
    message = failed.failure_message or ""
    assert "does not read back as itself" in message and "field 'name'" in message
    assert "'ann!'" in message and "'ann!!'" in message
    assert await replay(plan, result.log) == result  # type: ignore[arg-type]


async def test_a_strict_model_resumes_and_replays(tmp_path: Path) -> None:
    """The initial state is read back from the log's JSON form, where a strict tuple field
    is a list (it was read as a Python list, which a strict tuple refuses)."""
    seen: list[Any] = []
    a = node("a", Strict, lambda s: {"point": (s.point[0] + 1, 2)}, seen)
    plan = seq(a)

    live = await interpret(plan, Strict(point=(1, 1)), store=FileStore(tmp_path / "runs"))

    assert live.final_state == Strict(point=(2, 2))
    assert await replay(plan, live.log) == live  # type: ignore[arg-type]


async def test_an_initial_state_whose_json_does_not_read_back_is_refused() -> None:
    """A computed field is written, and a model that forbids extra fields refuses it when
    its JSON is read: refused before anything runs, naming the field and the fix."""
    seen: list[Any] = []
    plan = seq(node("a", Closed, lambda s: {"net": 2}, seen))

    with pytest.raises(StateNotSerializable, match="gross") as caught:
        await interpret(plan, Closed())

    assert "does not read back as Closed" in str(caught.value)
    assert "nothing was run" in str(caught.value) and seen == []


def test_reads_back_is_sure_only_of_schemas_whose_json_is_themselves() -> None:
    class Plain(BaseModel):
        value: int
        when: datetime.datetime | None = None
        items: list[Plain] = []
        by_id: dict[int, str] = {}

    class TextOrTime(BaseModel):
        value: str | datetime.datetime

    assert reads_back(Plain) and reads_back(Aliased) and reads_back(Strict)
    for schema in (Loose, Shouting, Closed, TextOrTime):
        assert not reads_back(schema), schema
