"""A run started as a script replays from the command line and from an importing process
(issue 9, item 13).

``python agent.py`` records its schemas as ``__main__:AgentState``; the same classes are
``agent:AgentState`` once ``agent`` is imported. ``python -m stroma replay STORE RUN --plan
agent:plan`` (run from the script's folder) and ``replay(agent.plan, log)`` in a process that
imports ``agent`` resolve each recorded schema through the plan's own declared schemas and
replay clean; resuming the finished run from an importing process returns its result
without running a node. Every command-line error around it is one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = "ag-2"

AGENT = textwrap.dedent('''
    """An agent run as a script: python agent.py STORE RUN_ID."""
    import sys

    import anyio
    from pydantic import BaseModel

    from stroma import (FailureClass, FailurePolicy, FileStore, NodeContract, RunConfig,
                        branch, interpret, map_each, parallel, seq, stroma_node)


    class AgentState(BaseModel):
        question: str


    class Plan_(BaseModel):
        question: str
        queries: list[str]


    class Query(BaseModel):
        item: str


    class Hit(BaseModel):
        query: str
        score: int


    class Found(BaseModel):
        question: str
        queries: list[str]
        hits: list[Hit]


    class Answer(BaseModel):
        answer: str


    class Tags(BaseModel):
        tags: list[str]


    CALLS = []


    def node(node_id, inp, out):
        def mark(fn):
            async def counted(state):
                CALLS.append(node_id)
                return await fn(state)
            counted.__name__ = fn.__name__
            return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=inp,
                                                     output_schema=out))(counted)
        return mark


    @node("plan_queries", AgentState, Plan_)
    async def plan_queries(s):
        return {"question": s.question, "queries": s.question.split()}, 40, "gpt-4o-mini"


    TRIES = {}


    @node("search", Query, Hit)
    async def search(q):
        TRIES[q.item] = TRIES.get(q.item, 0) + 1
        if q.item == "stroma" and TRIES[q.item] == 1:
            raise TimeoutError("search backend timed out")
        return {"query": q.item, "score": len(q.item)}


    @node("long_answer", Found, Answer)
    async def long_answer(s):
        return {"answer": f"{len(s.hits)} hits, best {max(h.score for h in s.hits)}"}


    @node("short_answer", Found, Answer)
    async def short_answer(s):
        return {"answer": "few hits"}


    @node("polish", Answer, Answer)
    async def polish(s):
        return {"answer": s.answer.upper()}


    @node("tag", Answer, Tags)
    async def tag(s):
        return {"tags": sorted(s.answer.split())}


    plan = (
        seq(plan_queries)
        >> map_each(search, over="queries", into="hits")
        >> branch(lambda s: len(s.hits) > 2, then=long_answer, otherwise=short_answer,
                  name="many_hits")
        >> parallel(polish, tag)
    )
    POLICY = {FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=0)}


    async def main(store, run_id):
        result = await interpret(plan, AgentState(question="what does stroma log"),
                                 store=FileStore(store),
                                 config=RunConfig(run_id=run_id, policy_map=POLICY))
        print(result.status, result.final_state.model_dump_json())


    if __name__ == "__main__":
        anyio.run(main, sys.argv[1], sys.argv[2], backend=sys.argv[3])
''')

IMPORTER = textwrap.dedent('''
    """Replay and resume the script's run from a process that imports agent."""
    import sys

    import anyio

    import agent
    from stroma import FileStore, RunConfig, interpret, replay


    async def main(store, run_id):
        log = await FileStore(store).read_log(run_id)
        again = await replay(agent.plan, log)
        resumed = await interpret(agent.plan, agent.AgentState(question="ignored"),
                                  store=FileStore(store), config=RunConfig(run_id=run_id))
        print(again.status, again.final_state.model_dump_json())
        print(resumed.status, resumed.final_state.model_dump_json())
        print("calls", len(agent.CALLS))


    anyio.run(main, sys.argv[1], sys.argv[2], backend=sys.argv[3])
''')


def run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A Python process in the script's folder, importing stroma from this checkout."""
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run([sys.executable, *args], cwd=folder, capture_output=True, text=True,
                          timeout=120, env=env)


def one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith("stroma: error: ") and out.stdout == "", out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def script_run(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The agent script written to a fresh folder and run once as ``python agent.py``
    (on the backend of the parameter), its run in the folder's FileStore ``runs``."""
    folder = tmp_path_factory.mktemp("script")
    (folder / "agent.py").write_text(AGENT)
    (folder / "importer.py").write_text(IMPORTER)
    out = run(folder, "agent.py", "runs", RUN, str(request.param))
    assert out.returncode == 0, out.stderr
    status, final = out.stdout.split(" ", 1)
    assert status == "COMPLETED", out.stdout
    return folder, final.strip()


@pytest.mark.slow
def test_the_script_records_its_schemas_under_main(script_run: tuple[Path, str]) -> None:
    """The script's log names its schemas by __main__ (what makes replaying it hard)."""
    folder, _ = script_run
    header = json.loads((folder / "runs" / "runs" / RUN / "log.jsonl").read_text()
                        .splitlines()[0])
    assert header["config"]["initial"]["schema"] == "__main__:AgentState"


@pytest.mark.slow
def test_the_command_line_replays_a_script_run_against_the_imported_plan(
    script_run: tuple[Path, str],
) -> None:
    """`python -m stroma replay runs ag-2 --plan agent:plan` from the script's folder says
    OK (exit 0), and `show` prints the run's trace: the branch, the map and the group
    are resolved through the plan's schemas, nothing raises."""
    folder, _ = script_run
    out = run(folder, "-m", "stroma", "replay", "runs", RUN, "--plan", "agent:plan")
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert out.stdout.startswith("OK") and out.stderr == ""
    shown = run(folder, "-m", "stroma", "show", "runs", RUN)
    assert shown.returncode == 0, shown.stderr
    for step in ("plan_queries", "map_each(search", "long_answer", "parallel(polish, tag)"):
        assert step in shown.stdout, (step, shown.stdout)


@pytest.mark.slow
def test_an_importing_process_replays_and_resumes_the_script_run(
    script_run: tuple[Path, str],
) -> None:
    """replay(agent.plan, log) in a process that imports agent gives the script's final
    state, and interpret with the run id returns the finished result calling no node."""
    folder, final = script_run
    for backend in ("asyncio", "trio"):
        out = run(folder, "importer.py", "runs", RUN, backend)
        assert out.returncode == 0, out.stderr
        replayed, resumed, calls = out.stdout.splitlines()
        assert replayed == f"COMPLETED {final}"
        assert resumed == f"COMPLETED {final}"
        assert calls == "calls 0"
        assert json.loads(final)["answer"] == "4 HITS, BEST 6"


@pytest.mark.slow
def test_command_line_errors_around_a_script_run_are_one_line(
    script_run: tuple[Path, str], tmp_path: Path,
) -> None:
    """A plan attribute the script lacks, a run id that is not there, a folder where
    agent does not import, a missing --plan: each one line, exit 2, saying what to do."""
    folder, _ = script_run
    one_line_error(run(folder, "-m", "stroma", "replay", "runs", RUN, "--plan", "agent:nope"),
                   "has no attribute 'nope'")
    one_line_error(run(folder, "-m", "stroma", "replay", "runs", "ag-3", "--plan",
                       "agent:plan"), "no run 'ag-3'", RUN)
    one_line_error(run(tmp_path, "-m", "stroma", "replay", str(folder / "runs"), RUN,
                       "--plan", "agent:plan"), "does not import")
    one_line_error(run(folder, "-m", "stroma", "replay", "runs", RUN), "--plan")
