"""Reading a log's text: the readers of the common records (a node's call, its answer,
its commit) give exactly the atoms the field-by-field reader gives, and leave every record
they do not take as written to it, so its errors stay exact."""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import pytest

import stroma.log as log_module
from stroma.errors import LogCorrupted
from stroma.log import EffectLog

GOLDEN = Path(__file__).parent.parent / "golden"
LOGS = sorted(GOLDEN.glob("v*/*.jsonl"))


def _field_by_field(text: str) -> EffectLog:
    fast = dict(log_module._FAST)
    log_module._FAST.clear()
    try:
        return EffectLog.from_jsonl(text)
    finally:
        log_module._FAST.update(fast)


@pytest.mark.parametrize("path", LOGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_the_common_records_read_alike_both_ways(path: Path) -> None:
    """Every golden log (both formats; loops, routes, waits, fan-outs, retries) reads to
    the same records with and without the readers of the common records."""
    text = path.read_text(encoding="utf-8")
    assert list(EffectLog.from_jsonl(text).records.items) == list(
        _field_by_field(text).records.items)


def test_a_loops_records_with_their_coordinates_read_alike() -> None:
    """A run's log with loop coordinates on its calls and commits reads alike both ways."""
    from benchmarks.loop import S, make_loop
    from stroma.runner import interpret

    plan, _, _ = make_loop(5)
    result = anyio.run(interpret, plan, S(value=0))
    assert result.log is not None
    text = result.log.to_jsonl()
    fast, slow = EffectLog.from_jsonl(text), _field_by_field(text)
    assert list(fast.records.items) == list(slow.records.items)
    assert any(atoms[0] == "Commit" and atoms[9] for atoms in fast.records.items
               if type(atoms) is tuple)


@pytest.mark.parametrize(("old", "new", "says"), [
    ('"attempt":1', '"attempt":-1', "attempt: expected a non-negative integer"),
    ('"node_id":"flaky"', '"node_id":7', "node_id: expected a string"),
    ('"coords":[]', '"coords":[["spin",1]]', "coords: expected a list of [kind, step id, n]"),
])
def test_a_damaged_common_record_is_reported_by_its_field(old: str, new: str,
                                                          says: str) -> None:
    """A common record the fast readers do not take is read field by field: the error
    names the line and the field, as it did before they existed."""
    text = (GOLDEN / "v2" / "retries.jsonl").read_text(encoding="utf-8")
    lines = text.split("\n")
    k = next(i for i, line in enumerate(lines) if '"t":"CallNode"' in line and old in line)
    lines[k] = lines[k].replace(old, new, 1)
    with pytest.raises(LogCorrupted, match=re.escape(f"line {k + 1}: field effect.{says}")):
        EffectLog.from_jsonl("\n".join(lines) + "\n")
