"""The command line on a FileStore: runs, show (text, --json, --svg) and replay, with the
fan-out children's attempts and a crashed run's finished children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import anyio
import pytest

from interpreters.stores.file import FileStore
from stroma.runner import RunConfig, interpret
from stroma.timeline import timeline
from tests.replay.pipelines import SCENARIOS, Num
from tests.timeline import pipelines as P

ROOT = Path(__file__).resolve().parents[2]
SVG = "{http://www.w3.org/2000/svg}"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stroma", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env=env or {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FileStore holding the golden retries and terminal runs, a map_each with retries
    inside, a parallel group and a run that crashed inside a fan-out."""
    path = tmp_path_factory.mktemp("clistore")

    async def record() -> None:
        fs = FileStore(path)
        for name in ("retries", "terminal"):
            build, config = SCENARIOS[name]

            async def no_sleep(seconds: float) -> None:
                return None

            cfg = config()
            await interpret(build(True), Num(value=1), store=fs,
                            config=RunConfig(**{k: getattr(cfg, k) for k in
                                                cfg.model_fields_set}),
                            sleep=no_sleep)
        await P.map_run(fs)
        await P.parallel_run(fs)
        await P.crashed_fan_out(fs)

    anyio.run(record)
    return path


def test_runs_lists_every_run_with_status(store: Path) -> None:
    """`runs` lists each run id with its status, crashed runs included."""
    out = cli("runs", str(store))
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[2:]}
    assert "COMPLETED" in lines["golden-retries"] and "FAILED" in lines["golden-terminal"]
    assert "running/crashed" in lines["crashed"] and "COMPLETED" in lines["map"]


def test_runs_json_and_status_filter(store: Path) -> None:
    """`runs --json` is a list of runs with status and totals; `--status` keeps only the
    runs with that status."""
    out = cli("runs", str(store), "--json")
    assert out.returncode == 0, out.stderr
    runs = {r["run_id"]: r for r in json.loads(out.stdout)}
    assert set(runs) == {"golden-retries", "golden-terminal", "map", "parallel", "crashed"}
    assert runs["map"]["tokens"] == 360 and runs["map"]["status"] == "COMPLETED"
    assert set(runs["map"]) == {"run_id", "status", "started", "duration_ms", "tokens",
                                "cost_usd", "attempts", "failures", "stop_reason", "problem",
                                "waiting_for", "held_by"}
    assert runs["crashed"]["held_by"] is None  # nobody runs it: its worker is gone
    failed = json.loads(cli("runs", str(store), "--json", "--status", "FAILED").stdout)
    assert [r["run_id"] for r in failed] == ["golden-terminal"]
    typo = cli("runs", str(store), "--status", "COMPLETE")
    assert typo.returncode == 2 and typo.stdout == ""
    assert "did you mean COMPLETED?" in typo.stderr and "running/crashed" in typo.stderr


def test_show_prints_the_attempts(store: Path) -> None:
    """`show` prints one line per attempt with step, attempt and outcome."""
    out = cli("show", str(store), "golden-retries")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("flaky")]
    assert [row.split()[1] for row in rows] == ["1", "2", "3"]
    assert "AMBIGUOUS" in rows[0] and "ok" in rows[2]


def test_show_lists_fan_out_childrens_attempts(store: Path) -> None:
    """`show` of a map_each lists each item's attempts, indented under the group: the
    item that failed twice has three lines."""
    out = cli("show", str(store), "map")
    assert out.returncode == 0, out.stderr
    item = [line.split() for line in out.stdout.splitlines()
            if line.startswith("  fetch [item 1]")]
    # step (3 words), attempt, group attempt (where it differs), outcome, ...
    assert [(row[3], row[4] if row[4] in ("ok", "AMBIGUOUS") else (row[4], row[5]))
            for row in item] == [("1", "AMBIGUOUS"), ("2", ("1", "AMBIGUOUS")),
                                 ("3", ("1", "ok"))]
    assert sum(1 for line in out.stdout.splitlines() if line.startswith("  fetch [item")) == 5


def test_show_lists_a_crashed_runs_finished_children(store: Path) -> None:
    """`show` of a run that crashed inside a fan-out lists the children that had
    finished, under the unfinished group."""
    out = cli("show", str(store), "crashed")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "run crashed: running/crashed"
    done = [line for line in out.stdout.splitlines() if line.startswith("  fetch [item")]
    assert len(done) == P.CRASH_FINISHED and all(" ok " in line for line in done)
    assert "unfinished" in out.stdout
    assert "a crashed run resumes when its plan runs again with this run id" in out.stdout
    assert "RunConfig(run_id='crashed')" in out.stdout
    # (a run in the store goes on from its log: the call to make takes no initial state)
    assert "interpret(plan, store=..., config=RunConfig(run_id='crashed'))" in out.stdout


def test_show_json_is_the_timeline(store: Path) -> None:
    """`show --json` prints the run's timeline in its documented JSON shape."""
    out = cli("show", str(store), "parallel", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    log = anyio.run(FileStore(store).read_log, "parallel")
    assert log is not None
    assert data == json.loads(json.dumps(timeline(log).to_json()))
    assert [r["label"] for r in data["rows"]] == ["parallel(left, right)", "left", "right",
                                                  "total"]


def test_show_svg_writes_the_timeline_picture(store: Path, tmp_path: Path) -> None:
    """`show --svg` writes a standalone SVG with a bar per attempt, coloured by outcome."""
    target = tmp_path / "map.svg"
    out = cli("show", str(store), "map", "--svg", str(target))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"wrote {target}: 4 rows, 6 attempt bars")
    root = ET.fromstring(target.read_text(encoding="utf-8"))
    bars = [el for el in root.iter(f"{SVG}rect") if "bar" in el.get("class", "").split()]
    assert [(b.get("data-row"), b.get("data-outcome")) for b in bars] == [
        ("map_each(fetch, over=urls, into=pages)", "ok"),
        ("map_each(fetch, over=urls, into=pages)[0]", "ok"),
        ("map_each(fetch, over=urls, into=pages)[1]", "AMBIGUOUS"),
        ("map_each(fetch, over=urls, into=pages)[1]", "AMBIGUOUS"),
        ("map_each(fetch, over=urls, into=pages)[1]", "ok"),
        ("map_each(fetch, over=urls, into=pages)[2]", "ok"),
    ]
    assert "href" not in target.read_text(encoding="utf-8")  # nothing external


def test_replay_ok_and_divergence(store: Path) -> None:
    """`replay` prints OK for the recording plan and the first divergence (exit 1, one
    line) for another."""
    ok = cli("replay", str(store), "golden-retries", "--plan",
             "tests.replay.test_replay:RETRIES_PLAN")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK")
    ok = cli("replay", str(store), "map", "--plan", "tests.timeline.pipelines:MAP_PLAN")
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stderr
    bad = cli("replay", str(store), "golden-retries", "--plan",
              "tests.replay.test_replay:REORDERED_PLAN")
    assert bad.returncode == 1
    assert bad.stdout.startswith("DIVERGED") and "record 0" in bad.stdout
    assert len(bad.stdout.strip().splitlines()) == 1


def test_replay_takes_a_plan_by_its_file_path(store: Path, tmp_path: Path) -> None:
    """`--plan path/to/file.py:attribute` imports the file (its folder on the path, for
    the modules beside it), as `python path/to/file.py` would run it; a path with no file
    is one line naming it."""
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "helpers_for_plan.py").write_text(
        "from tests.timeline.pipelines import MAP_PLAN as PLAN\n")
    (folder / "my_pipeline.py").write_text("from helpers_for_plan import PLAN\n")
    ok = cli("replay", str(store), "map", "--plan", f"{folder / 'my_pipeline.py'}:PLAN")
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stderr
    missing = cli("replay", str(store), "map", "--plan", "nowhere/pipeline.py:PLAN")
    assert missing.returncode == 2
    assert "there is no file 'nowhere/pipeline.py'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_show_after_a_sigkill_inside_a_fan_out(tmp_path: Path) -> None:
    """A process SIGKILLed inside a map_each leaves a run that `show` lists as
    running/crashed with the children that had finished."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.cli.crash_worker", str(tmp_path), "killed"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert worker.poll() is None, worker.communicate()[1]
            assert time.monotonic() < deadline, "the worker's children never became durable"
            log = anyio.run(FileStore(tmp_path).read_log, "killed")
            if log is not None and len(log.pending_children()) == P.CRASH_FINISHED:
                break
            time.sleep(0.05)
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.communicate()
    out = cli("show", str(tmp_path), "killed")
    assert out.returncode == 0, out.stderr
    assert "running/crashed" in out.stdout.splitlines()[0]
    done = [line for line in out.stdout.splitlines() if line.startswith("  fetch [item")]
    assert len(done) == P.CRASH_FINISHED


def test_a_run_whose_log_is_a_folder_is_one_damaged_row_and_the_rest_are_listed(
        store: Path, tmp_path: Path) -> None:
    """Something that is no file where a run's log belongs damages that run only: `runs`
    lists it as damaged, naming the path, beside the others; `show` of a run whose log is
    empty says it has no log (it is listed, as "no log")."""
    import shutil

    folder = tmp_path / "planted"
    shutil.copytree(store, folder)
    (folder / "runs" / "map" / "log.jsonl").unlink()
    (folder / "runs" / "map" / "log.jsonl").mkdir()
    (folder / "runs" / "golden-terminal" / "log.jsonl").write_bytes(b"")

    out = cli("runs", str(folder))
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[2:] if line.strip()}
    assert "damaged" in lines["map"] and "COMPLETED" in lines["golden-retries"]
    assert "no log" in lines["golden-terminal"]
    assert "not a regular file" in out.stdout

    shown = cli("show", str(folder), "golden-terminal")
    assert shown.returncode == 2
    assert "run 'golden-terminal'" in shown.stderr and "has no log" in shown.stderr
    assert "no run 'golden-terminal'" not in shown.stderr
