"""Plans are checked when built, before any node runs; each error names the step and the fix."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from stroma import NodeContract, PlanError, StromaRunner, stroma_node
from stroma.plan import branch, map_each, parallel, seq
from stroma.runner import interpret
from tests.combinators.kit import Item, Items, Num, Out, Script, field_model

A = field_model("a")
B = field_model("b")


class Doc(BaseModel):
    text: str
    tags: list[str]
    title: str = ""
    pages: list[Item] = []


class Tag(BaseModel):
    item: str


class Page(BaseModel):
    item: int


S = Script()


async def _same(s: Any) -> Any:
    return s


async def _a(s: Any) -> dict[str, int]:
    return {"a": 1}


async def _b(s: Any) -> dict[str, int]:
    return {"b": 1}


inc = S.node("inc", Num, Num, _same)
dbl = S.node("dbl", Num, Num, _same)
to_a = S.node("to_a", Num, A, _a)
to_b = S.node("to_b", Num, B, _b)
use_a = S.node("use_a", A, A, _same)
use_num = S.node("use_num", Num, Num, _same)
item_sq = S.node("item_sq", Item, Out, _same)
tag_len = S.node("tag_len", Tag, Out, _same)
doc_id = S.node("doc_id", Doc, Doc, _same)


def test_duplicate_ids_are_refused() -> None:
    """Two steps with one id fail, naming the id and asking for another one."""
    with pytest.raises(PlanError, match=r"'inc'.*another id"):
        seq(inc, dbl, inc)


@pytest.mark.parametrize(
    "build",
    [
        lambda: seq(inc, parallel(dbl, inc)),
        lambda: seq(inc, branch(lambda s: True, then=dbl, otherwise=inc)),
        lambda: seq(parallel(seq(inc, dbl), seq(dbl))),
        lambda: seq(inc) >> seq(dbl) >> seq(inc),
        lambda: seq(doc_id, map_each(seq(tag_len), over="tags", into="o"),
                    map_each(tag_len, over="tags", into="p")),
    ],
    ids=["in-parallel", "in-branch", "across-children", "across-rshift", "in-map-bodies"],
)
def test_duplicate_ids_are_refused_across_nesting(build: Any) -> None:
    """An id used twice anywhere in the nesting (group children, arms, bodies) fails."""
    with pytest.raises(PlanError, match="share the id"):
        build()


def test_two_unnamed_branches_on_the_same_predicate_are_told_to_take_a_name() -> None:
    def positive(s: Any) -> bool:
        return True

    with pytest.raises(PlanError) as err:
        seq(branch(positive, then=inc), branch(positive, then=dbl))
    msg = str(err.value)
    assert "'branch(positive)'" in msg and "name='check_2'" in msg
    named = seq(branch(positive, then=inc), branch(positive, then=dbl, name="again"))
    assert "again" in named.step_ids()


def test_a_missing_required_field_is_refused() -> None:
    """A step needing a field the previous output lacks fails, naming both steps' schemas,
    the field and three ways to fix it."""
    with pytest.raises(PlanError) as err:
        seq(to_a, use_num)
    msg = str(err.value)
    assert "'use_num'" in msg and "'value'" in msg and "Has_a" in msg
    assert "default" in msg and "in between" in msg


@pytest.mark.parametrize(
    "build",
    [
        lambda: seq(to_a, parallel(use_num, use_a)),
        lambda: seq(to_a, branch(lambda s: True, then=use_num)),
        lambda: seq(to_a, parallel(seq(use_num), use_a)),
        lambda: seq(to_a) >> use_num,
    ],
    ids=["parallel-child", "branch-arm", "sub-plan-child", "rshift"],
)
def test_a_missing_field_is_refused_inside_groups(build: Any) -> None:
    """The feed check reaches into parallel children, branch arms and sub-plans."""
    with pytest.raises(PlanError, match=r"'use_num' needs 'value'"):
        build()


def test_a_map_body_must_be_fed_by_the_item() -> None:
    """A map body whose input needs fields the list items lack is refused: a scalar item
    arrives as ``{"item": value}``, a model item as itself."""
    with pytest.raises(PlanError, match=r"'use_num' needs 'value'.*\(fields: item\)"):
        seq(doc_id, map_each(use_num, over="tags", into="o"))
    with pytest.raises(PlanError, match=r"'use_a' needs 'a'"):
        seq(doc_id, map_each(use_a, over="pages", into="o"))
    seq(doc_id, map_each(tag_len, over="tags", into="o"))  # {"item": str} feeds Tag
    seq(doc_id, map_each(item_sq, over="pages", into="o"))  # Item feeds Item


def test_after_a_branch_the_next_step_gets_what_both_arms_provide() -> None:
    """After a branch whose arms output different schemas, the next step may need any field
    both arms provide, and nothing else."""
    to_a2 = Script().node("to_a2", Num, field_model("a2_plus"), _same)
    wide = Script().node("to_ab", Num, _AB, _same)
    seq(inc, branch(lambda s: True, then=to_a, otherwise=wide), use_a)  # both have 'a'
    with pytest.raises(PlanError, match=r"'use_num' needs 'value'"):
        seq(inc, branch(lambda s: True, then=to_a, otherwise=wide), use_num)
    with pytest.raises(PlanError, match=r"'use_a' needs 'a'"):
        seq(inc, branch(lambda s: True, then=to_a, otherwise=to_a2), use_a)
    # An empty arm passes the state through: 'value' is there either way.
    seq(inc, branch(lambda s: True, then=dbl), use_num)
    with pytest.raises(PlanError, match=r"'use_a' needs 'a'"):
        seq(inc, branch(lambda s: True, then=to_a), use_a)


class _AB(BaseModel):
    a: int
    b: int = 0


def test_an_empty_parallel_is_refused() -> None:
    """``parallel()`` fails with an example of a correct call."""
    with pytest.raises(PlanError, match=r"parallel\(\) needs at least one step"):
        parallel()
    with pytest.raises(PlanError, match="empty sub-plan"):
        seq(parallel(seq(), inc))


def test_a_map_field_must_be_a_list() -> None:
    """map_each over a field that is not a list, or is missing, names the field, the schema
    and what map_each expects."""
    with pytest.raises(PlanError) as err:
        seq(doc_id, map_each(tag_len, over="title", into="o"))
    assert "'title' of Doc is not a list" in str(err.value)
    assert "map_each(tag_len, over=title, into=o)" in str(err.value)
    with pytest.raises(PlanError, match="'nope' of Doc has no such field"):
        seq(doc_id, map_each(tag_len, over="nope", into="o"))


def test_a_first_map_needs_its_input_schema() -> None:
    """A map_each that starts a plan must be told its state schema, and then works."""
    with pytest.raises(PlanError, match=r"first step.*input=YourState"):
        seq(map_each(item_sq, over="items", into="outs"))
    plan = seq(map_each(item_sq, over="items", into="outs", input=Items))
    assert plan.input_schema is Items


def test_a_sync_node_is_refused() -> None:
    """A node defined with ``def`` fails, asking for ``async def``."""

    def sync(s: Num) -> Num:
        return s

    contract = NodeContract(node_id="sync", input_schema=Num, output_schema=Num)
    marked = stroma_node("sync", contract)(sync)
    with pytest.raises(PlanError, match=r"'sync'.*not an async function.*async def"):
        seq(inc, marked)
    with pytest.raises(PlanError, match="not async"):
        StromaRunner.quick().node("sync2", input=Num, output=Num)(sync)


def test_an_undecorated_function_is_refused() -> None:
    """A plain function in a plan fails, saying how to make it a node."""

    async def plain(s: Num) -> Num:
        return s

    with pytest.raises(PlanError, match="not a stroma node"):
        seq(inc, plain)


@pytest.mark.parametrize("what", ["with_retry", "with_timeout"])
def test_policies_on_an_unknown_id_are_refused(what: str) -> None:
    """with_retry/with_timeout on an id the plan lacks fail, listing the ids it has."""
    plan = seq(inc, parallel(to_a, to_b))
    with pytest.raises(PlanError) as err:
        if what == "with_retry":
            plan.with_retry("nope", {"RECOVERABLE": {"max_retries": 1}})
        else:
            plan.with_timeout("nope", 10)
    msg = str(err.value)
    assert msg.startswith(what) and "'nope'" in msg
    assert "'inc'" in msg and "'parallel(to_a, to_b)'" in msg and "'to_a'" in msg


def test_bad_policy_values_are_refused() -> None:
    """A timeout that is not positive and a policy that is not one fail when set."""
    plan = seq(inc)
    with pytest.raises(PlanError, match="milliseconds > 0"):
        plan.with_timeout("inc", 0)
    with pytest.raises(PlanError, match="FailurePolicy"):
        plan.with_retry("inc", {"RECOVERABLE": 3})


@pytest.mark.anyio
async def test_nothing_runs_when_validation_fails(anyio_backend: str) -> None:
    """interpret with an invalid list raises before calling any node."""
    script = Script()
    first = script.node("first", Num, A, _a)
    second = script.node("second", Num, Num, _same)
    with pytest.raises(PlanError):
        await interpret([first, second], Num(value=1))
    assert script.calls == {}
