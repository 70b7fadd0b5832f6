"""The README's python code blocks as one module of user code.

The README's examples are written to run in order, as one module (a later block uses the
schemas, nodes and plan an earlier one defined), so ``readme_module`` joins them, each
preceded by a comment naming its line in README.md. tests/api/test_readme.py runs that
module; ``make lint`` writes it to a file with this script and checks it (with the demo)
under ``mypy --strict``:

    python -m tests.api.readme_examples build/typed-examples
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NamedTuple

__all__ = ("README", "Block", "python_blocks", "readme_module", "write_module")

README = Path(__file__).resolve().parents[2] / "README.md"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


class Block(NamedTuple):
    line: int  # the README line of the block's first line of code (1-based)
    code: str


def python_blocks(text: str) -> list[Block]:
    """Every ```python fenced block of a markdown text, in order."""
    return [
        Block(text.count("\n", 0, m.start(1)) + 1, m.group(1))
        for m in _FENCE.finditer(text)
    ]


def readme_module(text: str | None = None) -> str:
    """The README's python blocks joined into one module's source."""
    if text is None:
        text = README.read_text(encoding="utf-8")
    parts = [f"# README.md line {b.line}\n{b.code}" for b in python_blocks(text)]
    return "\n\n".join(parts)


def write_module(folder: Path) -> Path:
    """Write the README's module to ``folder/readme_examples.py`` (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "readme_examples.py"
    path.write_text(readme_module(), encoding="utf-8")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.api.readme_examples FOLDER")
    print(write_module(Path(sys.argv[1])))
