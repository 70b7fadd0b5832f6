"""Regenerate the golden effect logs of the current format: ``python -m tests.golden.make_golden``.

Writes ``v2/<scenario>.jsonl`` for every scenario of ``tests.replay.pipelines``; only when
the log format changes on purpose (the replay tests read these files). The version 1 logs
in ``v1/`` were recorded by stroma 0.2 and are never rewritten: they pin that older
format still reads, replays and resumes.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from tests.replay.pipelines import SCENARIOS, record

HERE = Path(__file__).parent
CURRENT = HERE / "v2"


async def main() -> None:
    CURRENT.mkdir(exist_ok=True)
    for name in SCENARIOS:
        result = await record(name)
        text = result.log.to_jsonl()
        assert text.startswith('{"stroma_log":2,'), "the current format is version 2"
        (CURRENT / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{name}: {result.status}, {len(result.log)} records")


if __name__ == "__main__":
    anyio.run(main)
