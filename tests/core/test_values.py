"""Effects, events and plan instructions are named tuples that behave as values of their
kind: equal only to a value of the same class, their live fields left out of comparisons
and hashes, and never equal to a plain tuple with the same items."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple

import pytest

from stroma import effects as fx
from stroma.log import ResumeMarker
from stroma.plan import Jump, NodeMarker
from stroma.values import named_value

AT = datetime(2026, 1, 1, tzinfo=UTC)


def test_values_of_two_kinds_with_the_same_items_differ() -> None:
    assert fx.Sleep(1.0) != fx.Slept(1.0)
    assert fx.Sleep(1.0) == fx.Sleep(1.0)
    assert fx.Sleep(1.0) != (1.0,)
    assert (1.0,) != fx.Sleep(1.0)
    assert fx.InputMissing(AT) != fx.NodeCancelled(AT, 0)


def test_live_fields_take_no_part_in_equality_or_hash() -> None:
    a = fx.ErrorInfo(("builtins.ValueError",), "bad", ValueError("bad"))
    b = fx.ErrorInfo(("builtins.ValueError",), "bad", None)
    assert a == b
    assert hash(a) == hash(b)
    assert a != fx.ErrorInfo(("builtins.ValueError",), "other")
    assert {a: 1}[b] == 1
    assert ResumeMarker("t", {"config": 1}) == ResumeMarker("t")
    assert NodeMarker("n", contract=None) == NodeMarker("n")


def test_unshown_fields_are_left_out_of_the_repr() -> None:
    call = fx.ChooseBranch("pick", state=object())  # type: ignore[arg-type]
    assert repr(call) == "ChooseBranch(step_id='pick')"
    assert repr(Jump(3)) == "Jump(target=3, step_id='')"


def test_an_input_payload_compares_by_its_json_value() -> None:
    assert fx.InputReceived(b'{"ok": true}', AT) == fx.InputReceived({"ok": True}, AT)
    assert fx.InputReceived({"ok": False}, AT) != fx.InputReceived({"ok": True}, AT)


def test_records_with_states_are_not_hashable() -> None:
    record = fx.RecordAttempt("n", "r", 1, AT, {"x": 1}, None, 0)
    with pytest.raises(TypeError, match="unhashable"):
        hash(record)
    assert record != tuple(record)


def test_named_value_lists_the_fields_it_compares() -> None:
    @named_value(live=("obj",), unshown=("obj",))
    class Pair(NamedTuple):
        key: str
        obj: object = None

    assert Pair._compared == ("key",)  # type: ignore[attr-defined]
    assert Pair("k", 1) == Pair("k", 2)
    assert not Pair("k", 1) != Pair("k", 2)
    assert repr(Pair("k", 1)) == "Pair(key='k')"
