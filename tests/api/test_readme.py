"""README.md's promises hold: every name its python blocks use imports from ``stroma``, the
blocks run as written and print what their comments say, and they (with the demo and
tests/api/typed_user_code.py) pass ``mypy --strict``.

The blocks are written to run in order as one module (a later block uses the schemas,
nodes and plan an earlier one defined): tests/api/readme_examples.py joins them, and
nothing else is added. They run in a temporary folder, since one keeps its runs in a
FileStore at ``runs``.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import stroma
from stroma import RunStatus
from tests.api import typed_user_code
from tests.api.readme_examples import README, python_blocks, readme_module, write_module

ROOT = Path(__file__).resolve().parents[2]
TEXT = README.read_text(encoding="utf-8")
BLOCKS = python_blocks(TEXT)


def _names_from_stroma(source: str) -> list[str]:
    return [
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module == "stroma"
        for alias in node.names
    ]


def _expected_prints(source: str) -> list[str]:
    """What each ``print(...)  # text`` line of the blocks says it prints."""
    return [
        line.split("#", 1)[1].strip()
        for line in source.splitlines()
        if line.startswith("print(") and "#" in line
    ]


def _run_readme(folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str]:
    monkeypatch.chdir(folder)
    namespace: dict[str, Any] = {"__name__": "readme_examples"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_module(TEXT), str(README), "exec", dont_inherit=True), namespace)
    return namespace, out.getvalue()


def test_the_readme_has_the_examples_it_documents() -> None:
    """The block finder sees the README's python blocks: the five lines, the plan (with its
    nodes) and the replay example."""
    joined = "\n".join(b.code for b in BLOCKS)
    assert len(BLOCKS) >= 4
    assert "runner.run([double], Input(value=5))" in joined
    assert "map_each(fetch" in joined and "branch(" in joined and "parallel(seq(" in joined
    assert "await replay(plan, result.log)" in joined
    assert all(TEXT.splitlines()[b.line - 2].startswith("```python") for b in BLOCKS)


def test_every_name_the_readme_imports_from_stroma_is_exported() -> None:
    """Each name a README block imports from ``stroma`` is in ``stroma.__all__`` (the
    combinators ``seq, parallel, branch, map_each`` included) and imports."""
    names = _names_from_stroma(readme_module(TEXT))
    assert {"seq", "parallel", "branch", "map_each", "interpret", "replay", "RunConfig",
            "FileStore", "StromaRunner", "FailurePolicy"} <= set(names)
    missing = [n for n in names if n not in stroma.__all__ or not hasattr(stroma, n)]
    assert missing == []
    namespace: dict[str, Any] = {}
    exec("from stroma import seq, parallel, branch, map_each", namespace)
    assert namespace["parallel"] is stroma.parallel


def test_the_readme_blocks_run_and_print_what_they_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run in order as one module, the blocks complete, print what their ``# ...`` comments
    show, and the replay example's run is kept in the FileStore at ``runs``."""
    namespace, printed = _run_readme(tmp_path, monkeypatch)

    expected = _expected_prints(readme_module(TEXT))
    assert len(expected) >= 2
    assert printed.splitlines() == expected
    assert namespace["result"].status is RunStatus.COMPLETED
    assert (tmp_path / "runs").is_dir()
    log = asyncio.run(stroma.FileStore(tmp_path / "runs").read_log("nightly-42"))
    assert log is not None and log.finish is not None
    assert log.finish.status is RunStatus.COMPLETED


@pytest.mark.anyio
async def test_the_readme_plan_runs_on_both_backends(
    anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's plan (built as written) runs to the same final state under asyncio and
    trio, and replays to the same result."""
    namespace, _ = await anyio.to_thread.run_sync(_run_readme, tmp_path, monkeypatch)
    plan, doc = namespace["plan"], namespace["Doc"]

    result = await stroma.interpret(plan, doc(text="https://a.example https://b.example"))

    assert result.status is RunStatus.COMPLETED
    assert result.final_state.model_dump() == {
        "summary": "final: a short read", "keywords": ["read", "short"]
    }
    assert (await stroma.replay(plan, result.log)) == result


@pytest.mark.anyio
async def test_the_typed_user_code_runs(anyio_backend: str, tmp_path: Path) -> None:
    """The user code checked under mypy --strict is valid at run time too: the stores build
    without connecting, a group awaited alone merges, a summary is NodeUsage by node."""
    file_store, redis_store, sync_store, pg_store = typed_user_code.stores(str(tmp_path))
    assert isinstance(file_store, stroma.FileStore) and isinstance(pg_store, stroma.PostgresStore)
    assert isinstance(redis_store, stroma.RedisStore)
    assert isinstance(sync_store, stroma.SyncRedisStore)
    assert await typed_user_code.merged(typed_user_code.Seed(value=2)) == {"left": 2, "right": -2}
    usage = typed_user_code.summary(stroma.CheckpointKey("r", "n"))
    assert usage == {"n": stroma.NodeUsage("n", 1, 0.0, 1.0)}


def test_readme_examples_and_the_demo_pass_mypy_strict(tmp_path: Path) -> None:
    """``mypy --strict`` (what make lint runs) passes on the README's blocks, the demo and the
    typed user code: the lazily exported stores have their real types."""
    module = write_module(tmp_path / "typed")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--cache-dir", str(tmp_path / "cache"), str(module), "stroma/demo.py",
         "tests/api/typed_user_code.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found in 3 source files" in out.stdout
