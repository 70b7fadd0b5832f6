"""Checks and schema resolution shared by the durable stores."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from stroma.errors import StoreError
from stroma.schemas import resolve_declared

__all__ = ("check_lines", "check_state", "resolve")


def check_state(state: object, node_id: object, op: str) -> BaseModel:
    if not isinstance(state, BaseModel):
        raise TypeError(
            f"{op}: the checkpoint state for node {node_id!r} must be a pydantic BaseModel "
            f"instance, got {type(state).__name__}; save the node's output model"
        )
    return state


def check_lines(lines: Sequence[str], op: str, *, nul: bool = False) -> list[str]:
    """The log lines to append: each a str holding one JSON line (and no NUL if ``nul``)."""
    if isinstance(lines, str | bytes):
        raise TypeError(f"{op}: lines must be a sequence of str (one JSON line each), got a str")
    out = list(lines)
    for n, line in enumerate(out):
        if not isinstance(line, str):
            raise TypeError(
                f"{op}: line {n} must be a str (one JSON line), got {type(line).__name__}"
            )
        if "\n" in line or "\r" in line or (nul and "\x00" in line):
            what = "a line break or a NUL character" if nul else "a line break"
            raise StoreError(
                f"{op}: line {n} contains {what}; each item must be one JSON line (JSON "
                "escapes these) without its trailing newline"
            )
    return out


def resolve(ref: object, source: str) -> type[BaseModel]:
    """The declared schema a stored reference names; never imports anything."""
    return resolve_declared(ref, source=source)
