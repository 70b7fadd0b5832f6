"""A plan that no longer matches a run's log is refused before any node is called."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from interpreters.stores.file import LOG_NAME, FileStore
from stroma import NondeterminismError
from stroma.runner import interpret
from tests.resume.pipeline import Num, Pipeline, config

pytestmark = pytest.mark.anyio

RUN = "changed"


class Total(BaseModel):
    """Another output contract for ``total``."""

    value: int
    note: str = ""


CHANGES: dict[str, dict[str, Any]] = {
    "renamed node already in the log": {"rename": {"a": "a2"}},
    "renamed node not yet reached": {"rename": {"f": "f2"}},
    "renamed fan-out child": {"rename": {"right": "right2"}},
    "changed contract": {"total_output": Total},
}


async def _log_cut_after_flaky(folder: Path) -> bytes:
    """A run's log cut just after flaky's commit record (as a crash leaves it)."""
    await interpret(Pipeline().nodes(), Num(value=1), store=FileStore(folder),
                    config=config(RUN))
    path = folder / "runs" / RUN / LOG_NAME
    lines = path.read_bytes().split(b"\n")
    n = next(k for k, line in enumerate(lines)
             if b'"Commit","node_id":"flaky"' in line)
    cut = b"".join(line + b"\n" for line in lines[: n + 1])
    path.write_bytes(cut)
    return cut


@pytest.mark.parametrize("change", sorted(CHANGES))
async def test_a_changed_plan_on_an_unfinished_log_raises_before_any_node(
    tmp_path: Path, change: str
) -> None:
    """Resuming a crashed run with a renamed node or a changed contract raises
    NondeterminismError before any node is called and leaves the log as it was."""
    folder = tmp_path / "store"
    cut = await _log_cut_after_flaky(folder)
    changed = Pipeline(**CHANGES[change])
    with pytest.raises(NondeterminismError):
        await interpret(changed.nodes(), Num(value=1), store=FileStore(folder),
                        config=config(RUN))
    assert not changed.called
    assert (folder / "runs" / RUN / LOG_NAME).read_bytes() == cut

    # The plan that recorded it still resumes the run.
    same = Pipeline(flaky_failed=True)
    result = await interpret(same.nodes(), Num(value=1), store=FileStore(folder),
                             config=config(RUN))
    assert result.final_state == Num(value=23)
    assert not same.called & {"a", "flaky"}


@pytest.mark.parametrize("change", sorted(CHANGES))
async def test_a_changed_plan_on_a_finished_log_raises_before_any_node(
    tmp_path: Path, change: str
) -> None:
    """Asking again for a finished run with a changed plan raises NondeterminismError and
    calls nothing (it never passes off the old result as the new plan's)."""
    folder = tmp_path / "store"
    await interpret(Pipeline().nodes(), Num(value=1), store=FileStore(folder),
                    config=config(RUN))
    changed = Pipeline(**CHANGES[change])
    with pytest.raises(NondeterminismError):
        await interpret(changed.nodes(), Num(value=1), store=FileStore(folder),
                        config=config(RUN))
    assert not changed.called
