"""Checks every store makes of what it is given, with the same words from each store.

Light on purpose (pydantic and stroma only): the in-memory stores import it, and ``import
stroma`` loads them.
"""

from __future__ import annotations

from pydantic import BaseModel

from stroma.errors import StateNotSerializable, StromaTypeError
from stroma.schemas import serialization_problem, state_json

__all__ = ("checkpoint_json", "require_model_type")


def require_model_type(method: str, schema: object) -> None:
    """The StromaTypeError of ``method`` (``"FileStore.load_typed"``...) when ``schema`` is
    not a pydantic model class."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return
    found = (
        f"the class {schema.__qualname__}" if isinstance(schema, type)
        else f"{schema!r:.80} (a {type(schema).__name__})"
    )
    args = ("run_id, node_id, schema" if method.endswith("load_typed")
            else "run_id, node_id, state, schema")
    raise StromaTypeError(
        f"{method}({args}): schema must be a BaseModel type, got "
        f"{found}: pass the pydantic model class of the state, e.g. type(state)"
    )


def checkpoint_json(state: BaseModel, node_id: object, op: str) -> bytes:
    """``state_json(state)``: the checkpoint's JSON text, or StateNotSerializable naming the
    field that JSON cannot hold and the fix (in the words a run's failed attempt uses), raised
    before the store writes anything."""
    try:
        return state_json(state)
    except Exception as exc:  # (pydantic's serialization errors, a RecursionError)
        problem = serialization_problem(state, exc)
    raise StateNotSerializable(
        f"{op}: the checkpoint of node {node_id!r} cannot be stored: {problem}; save values "
        "JSON can hold (text, not raw bytes; base64-encode binary data). Nothing was saved"
    )
