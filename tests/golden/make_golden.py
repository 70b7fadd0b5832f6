"""Regenerate the golden effect logs: ``python -m tests.golden.make_golden``.

Only when the log format changes on purpose; the replay tests read these files.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from tests.replay.pipelines import SCENARIOS, record

HERE = Path(__file__).parent


async def main() -> None:
    for name in SCENARIOS:
        result = await record(name)
        (HERE / f"{name}.jsonl").write_text(result.log.to_jsonl(), encoding="utf-8")
        print(f"{name}: {result.status}, {len(result.log)} records")


if __name__ == "__main__":
    anyio.run(main)
