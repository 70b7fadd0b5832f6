"""docs/timeline.svg, the README's picture, is what `show --svg` draws for the demo-like
run of docs/make_timeline.py: regenerated here and compared, bar by bar."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest

from interpreters.stores.file import FileStore
from stroma.svg import timeline_svg
from stroma.timeline import timeline

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "timeline.svg"
SVG = "{http://www.w3.org/2000/svg}"


def _maker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_timeline", ROOT / "docs" /
                                                  "make_timeline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_timeline"] = module  # pydantic resolves the models' annotations there
    spec.loader.exec_module(module)
    return module


def bars(svg: str) -> list[tuple[str | None, str | None, str | None]]:
    root = ET.fromstring(svg.encode("utf-8"))
    return [(el.get("data-row"), el.get("data-attempt"), el.get("data-outcome"))
            for el in root.iter(f"{SVG}rect") if "bar" in el.get("class", "").split()]


@pytest.mark.anyio
async def test_the_readme_picture_is_the_tools_drawing_of_the_run(
    tmp_path: Path, anyio_backend: str,
) -> None:
    """Recording the demo-like run again and drawing it gives the committed picture:
    the same bars (row, attempt, outcome) on either backend, and the same bytes on asyncio
    (whose scheduling, and so the virtual clock, is the one the picture was made with)."""
    maker = _maker()
    await maker.record(str(tmp_path))
    log = await FileStore(tmp_path).read_log(maker.RUN_ID)
    assert log is not None
    drawn = timeline_svg(timeline(log))
    committed = DOC.read_text(encoding="utf-8")
    assert bars(drawn) == bars(committed)
    assert ("fetch", "1", "RECOVERABLE") in bars(committed)
    assert ("map_each(read, over=sources, into=pages)[1]", "2", "ok") in bars(committed)
    if anyio_backend == "asyncio":
        assert drawn == committed, "docs/timeline.svg is stale: python docs/make_timeline.py"


@pytest.mark.slow
def test_make_timeline_writes_the_committed_file(tmp_path: Path) -> None:
    """`python docs/make_timeline.py OUT` (the CLI's show --svg) writes the committed file."""
    out = tmp_path / "timeline.svg"
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "make_timeline.py"), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_text(encoding="utf-8") == DOC.read_text(encoding="utf-8")
