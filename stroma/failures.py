"""Failure classes, retry policies, and the rules that classify an exception.

A failed attempt is classified RECOVERABLE (retry), TERMINAL (stop the run, FAILED) or
AMBIGUOUS (retry a little). User classifiers run first, in list order, and the first that
answers wins; the built-in rules apply last. The built-in rules exist twice over one
table, applied to an exception's class names (``exception_type_names``), which is what
a log records: a run and its replay classify without the exception object, and
``classify`` (for a live exception) makes the same decision through ``decide_class``.

``max_retries`` counts retries after the first attempt: 3 allows 4 attempts, 0 allows one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from stroma.contracts import ContractViolation
from stroma.cost import BudgetExceeded
from stroma.errors import (
    ChildFailed,
    ChildFailedTerminally,
    StateNotSerializable,
    StromaTypeError,
    StromaValueError,
    _validated_init,
)

__all__ = (
    "Classifier",
    "FailureClass",
    "FailurePolicy",
    "Located",
    "NodeContext",
    "RetryBudget",
    "StepContext",
    "builtin_class_for_names",
    "check_verdict",
    "classify",
    "decide_class",
    "default_policy_map",
    "exception_type_names",
    "resolve_policy",
    "where_text",
)


class FailureClass(StrEnum):
    """What to do about a failed attempt. ``str()`` gives the name (``RECOVERABLE``)."""

    RECOVERABLE = "RECOVERABLE"
    TERMINAL = "TERMINAL"
    AMBIGUOUS = "AMBIGUOUS"


# The longest backoff ceiling a policy takes: a day (longer waits are better spent with
# the run ended and resumed later; infinity would hang the run).
_MAX_BACKOFF_SECONDS = 86_400


@_validated_init
class FailurePolicy(BaseModel):
    """How often to retry a failure class, and the backoff ceiling before each retry."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    max_retries: int = Field(default=3, ge=0)
    backoff_seconds: float = Field(default=1.0, ge=0.0)

    @field_validator("max_retries", "backoff_seconds", mode="before")
    @classmethod
    def _not_negative(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            what = (
                "the number of retries after the first attempt (0 allows exactly one "
                "attempt, 3 allows four)" if info.field_name == "max_retries"
                else "the ceiling of the jittered delay before each retry, in seconds"
            )
            raise StromaValueError(
                f"FailurePolicy.{info.field_name} must be >= 0, got {value!r}: it is {what}; "
                f"use FailurePolicy({info.field_name}=0) for "
                f"{'no retries' if info.field_name == 'max_retries' else 'no delay'}"
            )
        if (info.field_name == "backoff_seconds" and isinstance(value, int | float)
                and not isinstance(value, bool) and not value <= _MAX_BACKOFF_SECONDS):
            raise StromaValueError(
                f"FailurePolicy.backoff_seconds must be a number of seconds up to "
                f"{_MAX_BACKOFF_SECONDS:,} (a day), got {value!r}: a retry would wait that "
                "long (for ever, if infinite); use a delay of seconds or minutes, or let the "
                "run fail and run it again later with its run id to resume it"
            )
        return value


def default_policy_map() -> dict[FailureClass, FailurePolicy]:
    """The built-in policy of each failure class (a fresh dict each call)."""
    return {
        FailureClass.RECOVERABLE: FailurePolicy(max_retries=3, backoff_seconds=1.0),
        FailureClass.TERMINAL: FailurePolicy(max_retries=0, backoff_seconds=0.0),
        FailureClass.AMBIGUOUS: FailurePolicy(max_retries=1, backoff_seconds=0.5),
    }


class Located:
    """Where a call ran, read from its ``coords`` (outermost first: ``("loop", loop id,
    iteration)`` for each loop and ``("item", map step id, item index)`` for each
    map_each around it; ``()`` at the top). Shared by ``NodeContext`` and ``TraceEvent``."""

    __slots__ = ()
    coords: tuple[tuple[str, str, int], ...]

    @property
    def iteration(self) -> int | None:
        """The iteration of the innermost loop the call ran in (1-based), or None."""
        return next((n for kind, _, n in reversed(self.coords) if kind == "loop"), None)

    @property
    def item(self) -> int | None:
        """The item index of the innermost map_each the call ran in, or None."""
        return next((n for kind, _, n in reversed(self.coords) if kind == "item"), None)

    @property
    def where(self) -> str:
        """The coordinates as text: ``agent#3/map_each(fetch, ...)[7]``; "" at the top."""
        return where_text(self.coords)


def where_text(coords: Sequence[Sequence[Any]]) -> str:
    """Coordinates as text (``agent#3/map_each(fetch, ...)[7]``): loops as ``id#n``, map
    items as ``id[n]``, outermost first; "" for none."""
    return "/".join(f"{step}#{n}" if kind == "loop" else f"{step}[{n}]"
                    for kind, step, n in coords)


@dataclass(frozen=True, slots=True)
class NodeContext(Located):
    """What a classifier knows about the failed attempt (``attempt`` is 1-based).

    ``idempotency_key`` is the key of the logical call (the same for every retry and
    resume of it); ``coords`` where it ran, also as ``iteration``, ``item`` and ``where``
    (see ``Located``).
    """

    node_id: str
    attempt: int
    run_id: str
    idempotency_key: str | None = None
    coords: tuple[tuple[str, str, int], ...] = ()


StepContext = NodeContext

Classifier = Callable[[Exception, NodeContext], FailureClass | None]

# The built-in rules, in order; the first match wins. ContractViolation and BudgetExceeded
# come before ValueError in case a subclass of theirs is also a ValueError.
_BUILTIN_RULES: tuple[tuple[type[BaseException], FailureClass], ...] = (
    (ContractViolation, FailureClass.TERMINAL),
    (StateNotSerializable, FailureClass.TERMINAL),
    (ChildFailedTerminally, FailureClass.TERMINAL),
    (ChildFailed, FailureClass.RECOVERABLE),
    (BudgetExceeded, FailureClass.RECOVERABLE),
    (TimeoutError, FailureClass.RECOVERABLE),  # asyncio.TimeoutError is TimeoutError on 3.11
    (ValueError, FailureClass.AMBIGUOUS),
)
_FALLBACK_CLASS = FailureClass.AMBIGUOUS


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_BUILTIN_NAME_RULES: tuple[tuple[str, FailureClass], ...] = tuple(
    (_type_name(cls), failure) for cls, failure in _BUILTIN_RULES
)


def exception_type_names(exc: BaseException) -> tuple[str, ...]:
    """``module.QualName`` of every class in the exception's MRO, most specific first."""
    return tuple(_type_name(cls) for cls in type(exc).__mro__)


def builtin_class_for_names(type_names: Sequence[str]) -> FailureClass:
    """The built-in rules applied to an exception's MRO names (see exception_type_names)."""
    names = set(type_names)
    for name, failure in _BUILTIN_NAME_RULES:
        if name in names:
            return failure
    return _FALLBACK_CLASS


def check_verdict(classifier: object, answer: object, node_id: str) -> FailureClass | None:
    """What a classifier's answer means: a FailureClass, or None (it defers).

    A FailureClass's name ("TERMINAL") counts as that class. Anything else is a TypeError
    naming the classifier and the value. ``classify`` and a run ask every classifier's
    answer through this one rule (a run skips a classifier whose answer it rejects).
    """
    if answer is None or isinstance(answer, FailureClass):
        return answer
    if isinstance(answer, str) and answer in FailureClass.__members__:
        return FailureClass(answer)
    name = getattr(classifier, "__qualname__", None) or repr(classifier)
    raise StromaTypeError(
        f"classifier {name} returned {answer!r} (a {type(answer).__name__}) for "
        f"node {node_id!r}; a classifier must return a FailureClass or None "
        "(None defers to the next classifier)"
    )


def decide_class(answers: Sequence[object], type_names: Sequence[str]) -> FailureClass:
    """The class of a failed attempt: the first FailureClass among the classifiers'
    answers (in order), else the built-in rules applied to the exception's type names.

    This is the decision of ``classify`` with the classifiers already asked; the machine
    makes it with the answers an interpreter recorded (answers that are not a
    FailureClass, such as None or a note that a classifier raised, are passed over).
    """
    for answer in answers:
        if isinstance(answer, FailureClass):
            return answer
    return builtin_class_for_names(type_names)


def classify(
    exc: Exception,
    ctx: NodeContext,
    classifiers: Sequence[Classifier] | None = None,
) -> FailureClass:
    """Custom classifiers in order (first non-None wins), then the built-in rules."""
    answers: list[FailureClass] = []
    for classifier in classifiers or ():
        verdict = check_verdict(classifier, classifier(exc, ctx), ctx.node_id)
        if verdict is not None:
            answers.append(verdict)
            break
    return decide_class(answers, exception_type_names(exc))


class RetryBudget:
    """Retries used so far, per (run id, node id)."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}

    def increment(self, run_id: str, node_id: str) -> int:
        """Count one more retry of the node; returns the new count."""
        key = (run_id, node_id)
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        return count

    def count(self, run_id: str, node_id: str) -> int:
        return self._counts.get((run_id, node_id), 0)

    def exhausted(self, run_id: str, node_id: str, policy: FailurePolicy) -> bool:
        """True once the node has used all of ``policy.max_retries``."""
        return self.count(run_id, node_id) >= policy.max_retries


def resolve_policy(
    failure_class: FailureClass,
    node_id: str,
    node_policies: Mapping[str, Mapping[FailureClass, FailurePolicy]] | None = None,
    policy_map: Mapping[FailureClass, FailurePolicy] | None = None,
) -> FailurePolicy:
    """Per-node override, then the run's policy map, then ``default_policy_map()``."""
    if node_policies:
        override = node_policies.get(node_id)
        if override and failure_class in override:
            return override[failure_class]
    if policy_map and failure_class in policy_map:
        return policy_map[failure_class]
    return _DEFAULTS[failure_class]


_DEFAULTS: Mapping[FailureClass, FailurePolicy] = default_policy_map()  # frozen values
