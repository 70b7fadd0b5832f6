"""The payload check send_input falls back on when this process does not have the wait's
class (the CLI's send-input): the JSON Schema pydantic wrote, bounds, lengths and patterns
included, so a payload the run would refuse is refused before it is sent."""

from __future__ import annotations

from pydantic import BaseModel, Field

from stroma.schemas import json_schema_problems


class Amount(BaseModel):
    cents: int = Field(gt=0, le=1_000_000)
    currency: str = Field(pattern="^[A-Z]{3}$")
    note: str = Field(default="", max_length=5)
    tags: list[str] = Field(default=[], min_length=1)


SCHEMA = Amount.model_json_schema()


def test_a_payload_within_every_bound_fits() -> None:
    assert json_schema_problems({"cents": 5, "currency": "EUR", "tags": ["x"]}, SCHEMA) == []


def test_each_bound_length_and_pattern_broken_is_named_by_its_field() -> None:
    problems = json_schema_problems(
        {"cents": 0, "currency": "eur", "note": "too long", "tags": []}, SCHEMA)

    assert problems == [
        "cents: expected a number > 0, got 0",
        "currency: expected text matching '^[A-Z]{3}$', got 'eur'",
        "note: expected at most 5 characters, got 8",
        "tags: expected at least 1 items, got 0",
    ]
    assert json_schema_problems({"cents": 2_000_000, "currency": "EUR", "tags": ["x"]},
                                SCHEMA) == ["cents: expected a number <= 1000000, got 2000000"]
