"""A node output key that its output schema has no field for is dropped by pydantic
without a word (extra="ignore", the default): a typo (``{"don": True}`` for ``done``, or
``model_copy(update={"don": True})``) made a loop run out of iterations with no hint. A
key close to a field is warned of, once per node of a run, pointing at the node and
naming the field; the run itself is as before, a replay of its log warns of nothing, and
an extra key close to no field (given on purpose) is not warned of."""

from __future__ import annotations

import warnings
from typing import Any

import anyio
import pytest
from pydantic import BaseModel, ConfigDict, Field

from stroma import RunStatus, StromaWarning, interpret, loop, map_each, replay, seq
from stroma.contracts import NodeContract
from stroma.runner import stroma_node


class T(BaseModel):
    n: int = 0
    done: bool = False


class Other(BaseModel):
    don: bool


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")
    n: int = 0


class Aliased(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    n: int = Field(0, alias="count")


def node(node_id: str, schema: type[BaseModel] = T) -> Any:
    return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=schema,
                                             output_schema=schema))


def run(plan: Any, state: BaseModel) -> tuple[Any, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = anyio.run(lambda: interpret(plan, state))
    return result, [w for w in caught if issubclass(w.category, StromaWarning)]


def test_a_misspelled_key_in_a_loop_is_warned_of_once_naming_the_field() -> None:
    @node("step")
    async def step(t: T) -> dict[str, Any]:
        return {"n": t.n + 1, "don": t.n >= 2}

    result, caught = run(loop(step, until=lambda t: t.done, max_iterations=4), T())
    assert result.status is RunStatus.PARTIAL and result.final_state == T(n=4)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert message.startswith("node 'step' returned the key 'don' (did you mean 'done'?), "
                              "which is no field of its output schema T (its fields: n, done)")
    assert "extra='allow'" in message
    assert caught[0].filename == __file__  # it points at the node, not into stroma
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        again = anyio.run(lambda: replay(loop(step, until=lambda t: t.done, max_iterations=4),
                                         result.log))
    assert again == result and not quiet


def test_model_copy_with_an_unknown_field_and_a_model_of_another_class_are_warned_of() -> None:
    @node("copy")
    async def copy(t: T) -> T:
        return t.model_copy(update={"n": 1, "don": True})

    @node("other")
    async def other(t: T) -> Other:
        return Other(don=True)

    result, caught = run(seq(copy, other), T())
    # (other's output is Other's fields read as a T: n is its default again)
    assert result.status is RunStatus.COMPLETED and result.final_state == T(n=0)
    assert [str(w.message).split(",")[0] for w in caught] == [
        "node 'copy' returned the key 'don' (did you mean 'done'?)",
        "node 'other' returned the key 'don' (did you mean 'done'?)",
    ]


def test_a_map_each_child_and_usage_tuples_are_checked_too() -> None:
    class Items(BaseModel):
        items: list[T]
        out: list[T] = []

    @node("item")
    async def item(t: T) -> tuple[dict[str, Any], int]:
        return {"n": t.n, "dne": True}, 5

    plan = map_each(item, over="items", into="out", input=Items)
    result, caught = run(plan, Items(items=[T(n=1), T(n=2)]))
    assert result.status is RunStatus.COMPLETED and result.total_tokens == 10
    assert len(caught) >= 1
    assert all("node 'item' returned the key 'dne'" in str(w.message) for w in caught)


@pytest.mark.parametrize("schema,output", [
    (T, {"n": 1, "done": True}),
    (T, {"n": 1, "raw": "an extra key, given on purpose"}),  # close to no field
    (T, {"n": 1, "done": True, "don": 1}),  # the field is there too
    (Loose, {"n": 1, "extra": "kept"}),
    (Aliased, {"count": 3}),
    (Aliased, {"n": 3}),
])
def test_keys_the_schema_takes_are_not_warned_of(schema: type[BaseModel],
                                                 output: dict[str, Any]) -> None:
    @node("fine", schema)
    async def fine(s: BaseModel) -> dict[str, Any]:
        return output

    result, caught = run(seq(fine), schema())
    assert result.status is RunStatus.COMPLETED and not caught


def test_what_a_cached_property_keeps_on_the_model_is_no_stray_key() -> None:
    """pydantic keeps a ``functools.cached_property``'s value in the model's ``__dict__``
    beside its fields: a node returning such a model read there is not warned of."""
    import functools

    class Out(BaseModel):
        total: int = 0

        @functools.cached_property
        def totals(self) -> list[int]:
            return [self.total]

    @node("count", Out)
    async def count(s: Out) -> Out:
        out = Out(total=s.total + 1)
        assert out.totals == [s.total + 1]  # (read: now in out.__dict__)
        return out

    result, said = run([count], Out())
    assert result.status is RunStatus.COMPLETED and said == []


def test_with_warnings_made_errors_a_near_miss_is_a_terminal_violation_not_retried(
) -> None:
    """Under ``-W error`` the warning is the attempt's output contract violation: the run
    fails at once (TERMINAL), naming the key, and the node (an LLM call, say) is not
    called again to drop the key again."""
    calls: list[int] = []

    @node("finish")
    async def finish(s: T) -> dict[str, Any]:
        calls.append(1)
        return {"n": s.n + 1, "don": True}

    with warnings.catch_warnings():
        warnings.simplefilter("error", StromaWarning)
        result = anyio.run(lambda: interpret([finish], T()))
    assert calls == [1]
    assert result.status is RunStatus.FAILED
    [event] = list(result.trace)
    assert event.failure is not None and event.failure.value == "TERMINAL"
    assert "'don' (did you mean 'done'?)" in (event.failure_message or "")
