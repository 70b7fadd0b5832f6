"""The command line on agent runs (a loop with a route, a map_each in one iteration and an
await_input in another): `runs` shows a WAITING run and what it waits for, `show` a row per
iteration with the route choices and until answers, `send-input` answers the wait."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import anyio
import pytest

from interpreters.stores.file import FileStore
from tests.cli.test_cli import ROOT, SVG, cli
from tests.timeline import pipelines as P


def record_waiting(path: Path, run_id: str = "agent") -> None:
    anyio.run(P.agent_run, FileStore(path), run_id)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FileStore with a WAITING agent run and a finished map_each run."""
    path = tmp_path_factory.mktemp("agentstore")
    record_waiting(path)
    anyio.run(P.map_run, FileStore(path))
    return path


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A FileStore of its own with a WAITING agent run (send-input writes to it)."""
    record_waiting(tmp_path)
    return tmp_path


def digest_of(path: Path, run_id: str = "agent") -> str:
    runs = json.loads(cli("runs", str(path), "--json").stdout)
    (run,) = [r for r in runs if r["run_id"] == run_id]
    return str(run["waiting_for"][0]["digest"])


def sent(path: Path, run_id: str = "agent") -> str | None:
    async def read() -> str | None:
        return await FileStore(path).get_input(run_id, P.AGENT_KEY)

    return anyio.run(read)


def send(path: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stroma", "send-input", str(path), *args], cwd=ROOT,
        capture_output=True, text=True, timeout=120, input=stdin,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


# ---------------------------------------------------------------------------- runs


def test_runs_shows_what_a_waiting_run_waits_for(store: Path) -> None:
    """The text table gets a 'waiting for' column with the input's key and digest; the
    other runs' cells in it are empty."""
    out = cli("runs", str(store))
    assert out.returncode == 0, out.stderr
    header, _, *lines = out.stdout.splitlines()
    assert header.split("  ")[-1].strip() == "waiting for"
    digest = digest_of(store)
    (agent,) = [line for line in lines if line.startswith("agent ")]
    assert " WAITING " in agent
    assert agent.endswith(f"{P.AGENT_KEY} (digest {digest[:8]})")
    (other,) = [line for line in lines if line.startswith("map ")]
    assert P.AGENT_KEY not in other and "COMPLETED" in other


def test_runs_json_and_the_waiting_filter(store: Path) -> None:
    """--json gives each run's waiting_for (name, key, schema, digest, step, where);
    --status WAITING leaves only the waiting run."""
    runs = {r["run_id"]: r for r in json.loads(cli("runs", str(store), "--json").stdout)}
    (wait,) = runs["agent"]["waiting_for"]
    assert runs["agent"]["status"] == "WAITING"
    assert {k: wait[k] for k in ("name", "key", "schema", "step_id", "where")} == {
        "name": "approval", "key": P.AGENT_KEY, "schema": "Approval",
        "step_id": P.AGENT_WAIT, "where": "agent#3"}
    assert len(wait["digest"]) == 16
    assert runs["map"]["waiting_for"] == []
    only = json.loads(cli("runs", str(store), "--json", "--status", "WAITING").stdout)
    assert [r["run_id"] for r in only] == ["agent"]


def test_runs_without_a_waiting_run_has_no_waiting_column(tmp_path: Path) -> None:
    """A store with no WAITING run keeps the table as it was."""
    anyio.run(P.map_run, FileStore(tmp_path))
    header = cli("runs", str(tmp_path)).stdout.splitlines()[0]
    assert "waiting for" not in header and header.split()[-1] == "cost_usd"


# ---------------------------------------------------------------------------- show


def test_show_has_a_row_per_iteration_and_lists_choices(store: Path) -> None:
    """Rows say where they ran (think @agent#2, lookup @agent#2 item 1); the route
    choices and until answers come before the table, in order; the waiting run ends with
    what it waits for and the send-input command for this store."""
    out = cli("show", str(store), "agent")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "run agent: WAITING"
    choices = [line for line in lines if line.split(":")[0] in ("route", "until", "wait")]
    assert [" ".join(c.split()) for c in choices] == [
        "route: pick @agent#1: work", "until: agent#1: no, on to #2",
        "route: pick @agent#2: search", "until: agent#2: no, on to #3",
        "route: pick @agent#3: ship",
        f"wait: {P.AGENT_WAIT} @agent#3: waiting for {P.AGENT_KEY} (Approval), digest "
        f"{digest_of(store)[:8]}"]
    steps = [line[: len(line) - len(line.lstrip())] + re.split(r"\s{2,}", line.strip())[0]
             for line in lines if line.startswith(("think", "work", "  lookup"))]
    assert steps == ["think @agent#1", "work @agent#1", "work @agent#1", "think @agent#2",
                     "  lookup @agent#2 item 0", "  lookup @agent#2 item 1",
                     "think @agent#3"]
    (wait_row,) = [line for line in lines if line.startswith(f"{P.AGENT_WAIT} @agent#3")]
    assert " waiting " in wait_row
    digest = digest_of(store)
    assert lines[-2] == (f"WAITING for {P.AGENT_KEY} (Approval) at {P.AGENT_WAIT} @agent#3, "
                         f"digest {digest}")
    assert lines[-1] == (f"send it: python -m stroma send-input {store} agent "
                         f"'{P.AGENT_KEY}' 'JSON' --digest {digest}")


def test_show_json_has_iterations_marks_and_the_wait(store: Path) -> None:
    """--json rows carry iteration, item, where and coords; marks the route choices,
    until answers and the wait; waiting_for the wait."""
    data = json.loads(cli("show", str(store), "agent", "--json").stdout)
    rows = {r["key"]: r for r in data["rows"]}
    item = rows[f"{P.AGENT_MAP}@agent#2[1]"]
    assert (item["label"], item["iteration"], item["item"]) == ("lookup @agent#2 item 1", 2, 1)
    assert item["coords"] == [["loop", "agent", 2], ["item", P.AGENT_MAP, 1]]
    assert [r["iteration"] for r in data["rows"] if r["step_id"] == "think"] == [1, 2, 3]
    assert [(m["kind"], m["where"]) for m in data["marks"]] == [
        ("route", "agent#1"), ("until", "agent#1"), ("route", "agent#2"),
        ("until", "agent#2"), ("route", "agent#3"), ("wait", "agent#3")]
    assert [w["key"] for w in data["waiting_for"]] == [P.AGENT_KEY]


def test_show_svg_draws_a_row_per_iteration_with_markers(store: Path, tmp_path: Path) -> None:
    """The SVG has a row per step and iteration, a waiting bar on the wait's row, a
    diamond per route choice on its row, a line per until answer and a circle for the
    wait."""
    target = tmp_path / "agent.svg"
    out = cli("show", str(store), "agent", "--svg", str(target))
    assert out.returncode == 0, out.stderr
    root = ET.parse(target).getroot()
    rows = [g.get("data-row") for g in root.iter(f"{SVG}g") if g.get("class") == "row"]
    assert rows[:3] == ["think@agent#1", "work@agent#1", "think@agent#2"]
    assert rows[-1] == f"{P.AGENT_WAIT}@agent#3"
    outcomes = [(r.get("data-row"), r.get("data-outcome")) for r in root.iter(f"{SVG}rect")
                if (r.get("class") or "").startswith("bar ")]
    assert outcomes[-1] == (f"{P.AGENT_WAIT}@agent#3", "waiting")
    kinds = [(e.tag.removeprefix(SVG), (e.get("class") or "").split()[-1])
             for e in root.iter() if "marker" in (e.get("class") or "")]
    assert kinds == [("polygon", "mark-route"), ("line", "mark-until"),
                     ("polygon", "mark-route"), ("line", "mark-until"),
                     ("polygon", "mark-route"), ("circle", "mark-wait")]
    header = next(t for t in root.iter(f"{SVG}text") if (t.text or "").startswith("run "))
    (status,) = header.iter(f"{SVG}tspan")
    assert (status.text, status.get("fill")) == ("WAITING", "#00838f")  # not an error's red
    legend = "".join(t.text or "" for g in root.iter(f"{SVG}g") if g.get("class") == "legend"
                     for t in g.iter(f"{SVG}text"))
    assert "waiting" in legend


# ----------------------------------------------------------------------- send-input


def test_send_input_answers_the_wait_and_the_run_goes_on(fresh: Path) -> None:
    """A valid JSON payload is kept in the store; the output says what was sent and how to
    resume; running the plan again with the run id finishes the run with it."""
    digest = digest_of(fresh)
    out = send(fresh, "agent", "approval", '{"ok": true, "by": "ann"}', "--digest", digest)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == (f"sent {P.AGENT_KEY} (Approval) to run 'agent' in {fresh}: "
                        '{"ok": true, "by": "ann"}')
    # (the line to run needs no initial state: a run in the store goes on from its log)
    assert lines[-2].endswith("on this store (no initial state needed):")
    assert lines[-1] == (f"  await interpret(plan, store=FileStore({str(fresh)!r}), "
                         "config=RunConfig(run_id='agent'))")
    assert json.loads(sent(fresh) or "null") == {"ok": True, "by": "ann"}
    result = anyio.run(P.agent_resumed, FileStore(fresh))
    assert result.status.value == "RESUMED"
    assert result.final_state.done == ["a", "shipped"]
    assert result.final_state.approval.by == "ann"
    runs = json.loads(cli("runs", str(fresh), "--json").stdout)
    assert [(r["status"], r["waiting_for"]) for r in runs] == [("RESUMED", [])]


def test_send_input_reads_a_file_or_stdin_and_takes_the_key(fresh: Path) -> None:
    """@FILE reads the payload from a file, - from standard input; NAME may be the wait's
    key as runs shows it; a second answer the run has not taken is refused but with
    --replace."""
    payload = fresh / "approval.json"
    payload.write_text('{"ok": false}\n', encoding="utf-8")
    out = send(fresh, "agent", P.AGENT_KEY, f"@{payload}")
    assert out.returncode == 0, out.stderr
    assert json.loads(sent(fresh) or "null") == {"ok": False}
    out = send(fresh, "agent", "approval", "-", stdin='{"ok": true, "by": "bo"}')
    assert out.returncode == 2 and "already" in out.stderr and "--replace" in out.stderr
    assert json.loads(sent(fresh) or "null") == {"ok": False}  # (the first answer stays)
    out = send(fresh, "agent", "approval", "-", "--replace", stdin='{"ok": true, "by": "bo"}')
    assert out.returncode == 0, out.stderr
    assert json.loads(sent(fresh) or "null") == {"ok": True, "by": "bo"}


@pytest.mark.parametrize(("payload", "expected"), [
    ('{"ok": "maybe"}', "ok: expected boolean"),
    ('{"by": "ann"}', "ok: field required"),
    ("[1, 2]", "(the payload): expected object"),
])
def test_a_payload_that_does_not_fit_is_refused_and_nothing_is_written(
    fresh: Path, payload: str, expected: str,
) -> None:
    """A payload that breaks the wait's schema is one line naming the field, exit 2, and
    the store keeps no input: the run still waits."""
    out = send(fresh, "agent", "approval", payload)
    assert out.returncode == 2 and out.stdout == ""
    # (it names the wait's schema, though the CLI does not import it: "does not fit its
    # schema" said nothing of which)
    assert out.stderr.startswith("stroma: error: send_input: the input "
                                 f"'{P.AGENT_KEY}' does not fit Approval: ")
    assert expected in out.stderr and "nothing was sent" in out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert sent(fresh) is None
    assert json.loads(cli("runs", str(fresh), "--json").stdout)[0]["status"] == "WAITING"


@pytest.mark.parametrize(("args", "expected"), [
    (("agent", "approval", '{"ok": tru'), "the JSON argument is not JSON"),
    (("agent", "approval", "@/nonexistent/approval.json"), "cannot read the file"),
    (("agent", "verdict", '{"ok": true}'), f"waits for '{P.AGENT_KEY}', not 'verdict'"),
    (("agent", "approval", '{"ok": true}', "--digest", "0000000000000000"),
     "was meant for another request"),
    (("nope", "approval", '{"ok": true}'), "no run 'nope'"),
])
def test_send_input_errors_are_one_line_and_write_nothing(
    fresh: Path, args: tuple[str, ...], expected: str,
) -> None:
    """Bad JSON, an unreadable file, a name the run does not wait for, a stale digest and
    an unknown run are each one line saying what to do, exit 2, nothing written."""
    out = send(fresh, *args)
    assert out.returncode == 2, out.stdout
    assert out.stderr.startswith("stroma: error: ") and expected in out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert sent(fresh) is None


def test_send_input_to_a_run_that_does_not_wait(store: Path) -> None:
    """A finished run waits for nothing: the error says what it is."""
    out = send(store, "map", "approval", '{"ok": true}')
    assert out.returncode == 2
    assert "run 'map' is not waiting for input (it is COMPLETED)" in out.stderr


def test_help_lists_send_input() -> None:
    """`--help` names the command; its own help names the arguments."""
    top = cli("--help")
    assert top.returncode == 0 and "send-input" in top.stdout
    own = cli("send-input", "--help")
    assert own.returncode == 0
    assert all(word in own.stdout for word in ("STORE", "RUN_ID", "NAME", "JSON", "--digest",
                                               "@FILE"))
