"""The exceptions stroma raises: one base class, a subclass wherever a caller would catch it.

Messages name the thing, what was expected, what was found, and the fix.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from pydantic import ValidationError

__all__ = (
    "ChildFailed",
    "ChildFailedTerminally",
    "LogCorrupted",
    "NondeterminismError",
    "PlanError",
    "RunLocked",
    "StateNotSerializable",
    "StoreError",
    "StromaAttributeError",
    "StromaError",
    "StromaImportError",
    "StromaKeyError",
    "StromaModuleNotFoundError",
    "StromaTypeError",
    "StromaValidationError",
    "StromaValueError",
    "StromaWarning",
    "UnsafeSchemaRef",
)


class StromaError(Exception):
    """Base class of every error stroma raises on its own account."""

    def __reduce__(self) -> Any:
        # Pickled as its message and attributes, made again without calling its
        # ``__init__`` (whose arguments are not its ``args``): an error crosses a process
        # boundary (multiprocessing, a task queue's worker) as it was raised.
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(cls: type[StromaError], args: tuple[Any, ...], state: dict[str, Any]
             ) -> StromaError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class StromaWarning(StromaError, UserWarning):
    """A use of stroma that runs but likely not as meant (a setting that applies to no
    step, a state given that is not used); the message says what and the fix. A
    StromaError too: with warnings turned into errors (``-W error``), what leaves the
    library is still one of stroma's errors."""


# The folders of stroma's own code (this package and its interpreters, installed beside
# it): a warning is shown at the first frame outside them, the user's call.
_OWN_FOLDERS = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name) + os.sep
    for name in ("stroma", "interpreters")
)


def _user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the caller of this function that
    points at the user's code: the first frame out of stroma's packages (the user's
    ``interpret(...)`` call, say), however deep in stroma the warning is raised (awaited
    coroutines are frames of the chain too). 2 when every frame is stroma's."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        if not os.path.abspath(frame.f_code.co_filename).startswith(_OWN_FOLDERS):
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return 2


class StromaTypeError(StromaError, TypeError):
    """An argument of the wrong kind (a class where an instance goes, a sync function where
    an async one goes). A TypeError too, so code that catches TypeError keeps working."""


class StromaValueError(StromaError, ValueError):
    """An argument of the right kind with a value that cannot be (a negative limit, a
    malformed URL). A ValueError too, so code that catches ValueError keeps working."""


class StromaValidationError(StromaValueError, ValidationError):
    """A stroma settings model (RunConfig, FailurePolicy, ExecutionBudget, NodeContract)
    given a value it cannot hold: pydantic's ValidationError, with its errors and
    message, that is a StromaError too (code catching either keeps working)."""

    __reduce__ = ValidationError.__reduce__  # (pydantic's: its errors made again)

    @classmethod
    def of(cls, error: ValidationError) -> ValueError:
        """``error`` as one of these (a StromaValueError with its text, if pydantic cannot
        make its errors again)."""
        try:
            made: ValueError = cls.from_exception_data(
                error.title, error.errors(include_url=False))  # type: ignore[arg-type]
        except Exception:
            made = StromaValueError(str(error))
        return made


def _validated_init(model: type) -> type:
    """Make a settings model's ValidationError a StromaError: from its ``__init__`` and
    from ``model_validate`` / ``model_validate_json``."""

    def stroma_errors(fn: Any, name: str) -> Any:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ValidationError as e:
                if isinstance(e, StromaError):
                    raise
                raise StromaValidationError.of(e) from None

        call.__qualname__ = f"{model.__name__}.{name}"
        return call

    model.__init__ = stroma_errors(model.__init__, "__init__")  # type: ignore[misc]
    for name in ("model_validate", "model_validate_json"):
        method = getattr(model, name).__func__
        setattr(model, name, classmethod(stroma_errors(method, name)))
    return model


class StromaKeyError(StromaError, KeyError):
    """A lookup by a name that is not there (a node id without a contract, a timeline
    row); the message lists the names there are. A KeyError too."""

    def __str__(self) -> str:  # the message as written, not quoted as a KeyError's key
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class StromaImportError(StromaError, ImportError):
    """An optional dependency a store needs is not installed; the message names the
    extra to install. An ImportError too."""


class StromaModuleNotFoundError(StromaImportError, ModuleNotFoundError):
    """A schema reference names a module that cannot be imported. A ModuleNotFoundError
    (and an ImportError) too, as the earlier library raised."""


class StromaAttributeError(StromaError, AttributeError):
    """A schema reference names a class its module does not have. An AttributeError too,
    as the earlier library raised."""


class PlanError(StromaError, TypeError, ValueError):
    """A pipeline or plan is malformed; raised before any node runs.

    It is a TypeError (an undecorated function, a sync function) and a ValueError
    (duplicate ids, a missing contract), so code written against either keeps working.
    """


class NondeterminismError(StromaError):
    """Replaying a log produced an effect other than the recorded one."""

    def __init__(self, index: int, recorded: object, new: object, detail: str = "") -> None:
        self.index = index
        self.recorded = recorded
        self.new = new
        self.detail = detail
        msg = (
            f"replay diverged at record {index}: the log recorded {recorded!r} "
            f"but the plan now produces {new!r}"
        )
        if detail:
            msg += f" ({detail})"
        msg += (
            ". The plan changed since the run was recorded (a node renamed, added, removed "
            "or reordered, or a contract changed), or the log was altered: replay the log "
            "with the plan that recorded it, or start a new run id."
        )
        super().__init__(msg)


class LogCorrupted(StromaError):
    """An effect log or checkpoint could not be read back: names the source and the damage."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class StoreError(StromaError):
    """A store could not do what was asked (permanent failure, bad id, unreachable server)."""


class RunLocked(StoreError):
    """Another worker holds the lease on this run id."""

    def __init__(self, run_id: str, holder: str, *, this_process: bool = False,
                 holder_exited: bool = False) -> None:
        self.run_id = run_id
        self.holder = holder
        if holder_exited:  # (a process of this host that is not running any more)
            super().__init__(
                f"run {run_id!r} is locked by worker {holder!r}, whose process on this host "
                "has exited without letting go of it (it was killed, or lost its store's "
                "connection on the way out): the lease lets go of the run when it expires "
                "(the store's lease time after its last renewal). Run it again then, or use "
                "another run id."
            )
            return
        if this_process:  # (the holder's worker id is this process's)
            super().__init__(
                f"run {run_id!r} is locked by worker {holder!r}, a session of this very "
                "process: one still running (do not run the same run twice at once), or one "
                "cut off by an interrupt in an event loop still open (a notebook's), which "
                "holds it until the process exits. Wait for it, restart the process (or the "
                "notebook's kernel), or use another run id."
            )
            return
        super().__init__(
            f"run {run_id!r} is locked by worker {holder!r}: another process is executing "
            "it. Wait for it to finish (or for its lease to expire if it died), or use "
            "another run id."
        )


class UnsafeSchemaRef(StoreError):
    """A stored schema reference names something the plan or registry never declared."""

    def __init__(self, ref: str, known: object = (), *, source: str = "store") -> None:
        self.ref = ref
        self.source = source
        super().__init__(
            f"refusing to load schema {ref!r} (named in {source}): it is not a schema "
            "declared by the plan or "
            "the contract registry, so nothing was imported. Register a contract using "
            "this schema, or pass it explicitly to load_typed()."
        )


class ChildFailed(StromaError):
    """A fan-out child (a sub-plan of a parallel or map_each) ran out of retries."""


class ChildFailedTerminally(ChildFailed):
    """A fan-out child failed with a terminal error."""


class StateNotSerializable(StromaError):
    """A node's output kept its contract but cannot be stored: its JSON form cannot be made
    (bytes that are not UTF-8, nesting too deep, a value pydantic cannot serialize).

    The attempt fails (TERMINAL) and is recorded; the message names the field.
    """
