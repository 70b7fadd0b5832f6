"""Make docs/timeline.svg, the README's picture of a run, with the tool itself.

A demo-like research pipeline (a flaky fetch that is retried, a map_each over the
document's sources whose second read times out once and retries inside the fan-out, a
parallel summary and keyword pass priced by their models, an answer) runs on a FileStore
under ``simulate``'s virtual clock, so the run and the picture are the same every time;
then ``python -m stroma show STORE demo-run --svg docs/timeline.svg`` draws it.

    python docs/make_timeline.py [OUT.svg]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import stroma  # noqa: E402, F401  (first: importing interpreters alone is circular)
from interpreters.simulate import VirtualClock, simulate  # noqa: E402
from interpreters.stores.file import FileStore  # noqa: E402
from stroma import NodeContract, stroma_node  # noqa: E402
from stroma.failures import FailureClass, FailurePolicy, NodeContext  # noqa: E402
from stroma.plan import map_each, parallel, seq  # noqa: E402
from stroma.runner import RunConfig  # noqa: E402

RUN_ID = "demo-run"
OUT = ROOT / "docs" / "timeline.svg"


class Question(BaseModel):
    topic: str


class Document(BaseModel):
    topic: str
    text: str
    sources: list[str]


class Source(BaseModel):
    item: str


class Page(BaseModel):
    page: str


class Pages(BaseModel):
    topic: str
    text: str
    sources: list[str]
    pages: list[Page]


class Summary(BaseModel):
    summary: str


class Keywords(BaseModel):
    keywords: list[str]


class Analysis(BaseModel):
    summary: str
    keywords: list[str]


class Answer(BaseModel):
    answer: str


def _node(node_id: str, inp: type[BaseModel], out: type[BaseModel]) -> Any:
    return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=inp,
                                             output_schema=out))


def network_errors(exc: Exception, ctx: NodeContext) -> FailureClass | None:
    if isinstance(exc, ConnectionError | TimeoutError) or "503" in str(exc):
        return FailureClass.RECOVERABLE
    return None


def pipeline(clock: VirtualClock) -> Any:
    seen = {"fetch": 0, "read": 0}

    @_node("fetch", Question, Document)
    async def fetch(q: Question) -> Any:
        seen["fetch"] += 1
        await clock.sleep(0.040)
        if seen["fetch"] < 3:
            raise ConnectionError("503 service_unavailable from the document API")
        return {"topic": q.topic, "text": f"A long article about {q.topic}.",
                "sources": ["nasa.gov", "esa.int", "arxiv.org"]}

    @_node("read", Source, Page)
    async def read(s: Source) -> Any:
        await clock.sleep(0.030)
        if s.item == "esa.int":
            seen["read"] += 1
            if seen["read"] == 1:
                raise TimeoutError(f"{s.item} did not answer in time")
        return {"page": f"notes from {s.item}"}, 400, 60, "gpt-4o-mini"

    @_node("summarize", Pages, Summary)
    async def summarize(p: Pages) -> Any:
        await clock.sleep(0.120)
        return {"summary": p.text[:40] + "..."}, 1_200, 150, "gpt-4o"

    @_node("keywords", Pages, Keywords)
    async def keywords(p: Pages) -> Any:
        await clock.sleep(0.060)
        return {"keywords": ["solar", "sails"]}, 900, 40, "claude-haiku-4-5"

    @_node("answer", Analysis, Answer)
    async def answer(a: Analysis) -> Any:
        await clock.sleep(0.050)
        return {"answer": f"{a.summary} [{', '.join(a.keywords)}]"}, 400, 80, "gpt-4o-mini"

    plan = (seq(fetch)
            >> map_each(read, over="sources", into="pages")
            >> parallel(summarize, keywords)
            >> answer)
    return plan.with_retry("read", {FailureClass.RECOVERABLE: FailurePolicy(
        max_retries=2, backoff_seconds=0.08)})


async def record(folder: str) -> None:
    """Run the pipeline on virtual time into a FileStore at ``folder`` (run ``demo-run``)."""
    clock = VirtualClock()
    await simulate(
        pipeline(clock), Question(topic="solar sails"), clock=clock, store=FileStore(folder),
        config=RunConfig(
            run_id=RUN_ID, seed=42, classifiers=[network_errors],
            policy_map={FailureClass.RECOVERABLE: FailurePolicy(max_retries=3,
                                                                backoff_seconds=0.1)},
        ),
    )


def make(out: str | Path = OUT, backend: str = "asyncio") -> int:
    """Record the run and draw it into ``out`` with ``python -m stroma show --svg``."""
    from stroma.cli import main

    with tempfile.TemporaryDirectory(prefix="stroma-docs-") as folder:
        anyio.run(record, folder, backend=backend)
        return main(["show", folder, RUN_ID, "--svg", str(out)])


if __name__ == "__main__":
    raise SystemExit(make(sys.argv[1] if len(sys.argv) > 1 else OUT))
