"""Node contracts: the pydantic schemas a node's input and output must satisfy.

Validation happens at the boundary of every node: the input before the call, the
output after it. A violation is TERMINAL: retrying the same code on the same data
would only fail the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from stroma.errors import (
    StromaError,
    StromaKeyError,
    StromaTypeError,
    StromaValueError,
    StromaWarning,
    _validated_init,
)

__all__ = (
    "BoundaryValidator",
    "ContractRegistry",
    "ContractViolation",
    "Direction",
    "NodeContract",
    "StepContract",
    "StepViolation",
)

Direction = Literal["input", "output"]

# A schema's accepted keys (field names and aliases) and, for each required field, the
# keys that give it; None where pydantic does not drop unknown keys silently
# (extra="allow" keeps them, extra="forbid" refuses them).
_ACCEPTED: dict[type[BaseModel], tuple[frozenset[str], tuple[frozenset[str], ...], int] | None] = {}


def _field_keys(name: str, field: Any) -> set[str]:
    keys = {name}
    for alias in (field.alias, field.validation_alias):
        if isinstance(alias, str):
            keys.add(alias)
        elif alias is not None:  # AliasChoices / AliasPath: any first key
            for choice in getattr(alias, "choices", [alias]):
                path = getattr(choice, "path", [choice])
                if path and isinstance(path[0], str):
                    keys.add(path[0])
    return keys


def _accepted_keys(
    schema: type[BaseModel],
) -> tuple[frozenset[str], tuple[frozenset[str], ...], int] | None:
    """The keys a schema that drops the others takes (names and aliases), the keys of
    each required field, and how many fields it has; None for a schema that keeps or
    refuses other keys."""
    try:
        return _ACCEPTED[schema]
    except KeyError:
        pass
    accepted = None
    if schema.model_config.get("extra") in (None, "ignore"):
        every: set[str] = set()
        required: list[frozenset[str]] = []
        fields = schema.model_fields
        for name, field in fields.items():
            keys = _field_keys(name, field)
            every |= keys
            if field.is_required():
                required.append(frozenset(keys))
        accepted = (frozenset(every), tuple(required), len(fields))
    _ACCEPTED[schema] = accepted
    return accepted


_UNSEEN: Any = object()


# (schema, key) -> the field of the schema the key is a near miss of, or None.
_NEAR: dict[tuple[type[BaseModel], str], str | None] = {}


def _near_field(schema: type[BaseModel], key: str) -> str | None:
    try:
        return _NEAR[(schema, key)]
    except KeyError:
        pass
    import difflib  # (not at import: import stroma loads no difflib)

    fields = list(schema.model_fields)
    lowered = {f.lower(): f for f in fields}
    close = lowered.get(key.lower()) or next(
        iter(difflib.get_close_matches(key, fields, n=1, cutoff=0.75)), None)
    if len(_NEAR) < 10_000:
        _NEAR[(schema, key)] = close
    return close


def _stray_output_keys(schema: type[BaseModel], output: object) -> list[tuple[str, str]]:
    """The keys of a node's output that are near misses of a field of its output schema
    (``"don"`` for ``done``, ``"Done"``), each with that field: pydantic drops a key that
    is no field (nor alias) without a word. The keys are a dict's, the fields of a model
    of another class, or what ``model_copy(update=...)`` set on a model of the schema.
    Not a key whose field the dict has too, nor one close to no field (an extra key given
    on purpose); none for an output without a required field (its contract violation
    names that)."""
    known = _ACCEPTED.get(schema, _UNSEEN)  # (once per node call: the lookups inline)
    if known is _UNSEEN:
        known = _accepted_keys(schema)
    if type(output) is dict:
        keys: Any = output
    elif type(output) is schema:
        keys = output.__dict__
        if known is not None and len(keys) <= known[2]:  # (the usual case: nothing extra)
            return []
    elif isinstance(output, BaseModel) and not isinstance(output, schema):
        keys = type(output).model_fields
    else:
        return []
    if known is None or known[0].issuperset(keys):
        return []
    if any(not any(k in keys for k in field) for field in known[1]):
        return []  # a required field is missing: the output contract names it
    # (a model of the schema has every field: what model_copy set beside them is extra,
    # but for what the class itself puts there: a cached_property's value)
    own = type(output) is schema
    given = () if own else keys
    near = []
    for key in keys:
        if isinstance(key, str) and key not in known[0] and not (own and hasattr(schema, key)):
            close = _near_field(schema, key)
            if close is not None and close not in given:
                near.append((key, close))
    return near


def _has_extra_keys(schema: type[BaseModel], output: object) -> bool:
    """Whether a node's output has keys its output schema drops (the cheap test made on
    every call; what they are near is looked at once per node of a run)."""
    known = _ACCEPTED.get(schema, _UNSEEN)
    if known is _UNSEEN:
        known = _accepted_keys(schema)
    if known is None:
        return False
    if type(output) is dict:
        return not known[0].issuperset(output)
    if type(output) is schema:
        return len(output.__dict__) > known[2]
    return isinstance(output, BaseModel) and not isinstance(output, schema)


def _warn_stray_output_keys(
    node_id: str, schema: type[BaseModel], stray: list[tuple[str, str]], fn: Callable[..., Any]
) -> None:
    """A StromaWarning, pointing at the node's function, naming the keys its output had
    that its output schema does not, and the field each is close to."""
    fields = list(schema.model_fields)
    said = ", ".join(f"{key!r} (did you mean {close!r}?)" for key, close in stray[:5])
    many = len(stray) > 1
    message = (
        f"node {node_id!r} returned the key{'s' if many else ''} {said}"
        f"{', ...' if len(stray) > 5 else ''}, which {'are' if many else 'is'} no field of "
        f"its output schema {schema.__name__} (its fields: {', '.join(fields)}): "
        f"pydantic drops {'them' if many else 'it'}, so what the node put there is lost. "
        "Return the schema's field names, or give the schema "
        "model_config = ConfigDict(extra='allow') to keep other keys"
    )
    code = getattr(fn, "__code__", None)
    if code is None:
        warnings.warn(message, StromaWarning, stacklevel=2)
        return
    module_globals = getattr(fn, "__globals__", {})
    warnings.warn_explicit(
        message, StromaWarning, code.co_filename, code.co_firstlineno,
        module=getattr(fn, "__module__", None) or "stroma",
        registry=module_globals.setdefault("__warningregistry__", {}),
    )

_MAX_LISTED_ERRORS = 5


@_validated_init
class NodeContract(BaseModel):
    """The input and output schemas of one node."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, defer_build=True)

    node_id: str
    input_schema: type[BaseModel]
    output_schema: type[BaseModel]

    @field_validator("input_schema", "output_schema", mode="before")
    @classmethod
    def _must_be_model_class(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value
        found = (
            f"the class {value.__qualname__}" if isinstance(value, type)
            else f"{value!r} (an instance of {type(value).__name__})"
        )
        raise StromaValueError(
            f"{info.field_name} must be a pydantic BaseModel subclass, got {found}; "
            "pass the model class itself, e.g. input_schema=MyInput"
        )


StepContract = NodeContract


def _loc(error: Mapping[str, Any]) -> str:
    loc = error.get("loc") or ()
    return ".".join(str(part) for part in loc) or "(root)"


class ContractViolation(StromaError):
    """A node's input or output did not satisfy its schema.

    ``errors`` are pydantic error dicts (``ValidationError.errors()``); ``raw`` is the
    data that failed.
    """

    def __init__(
        self,
        node_id: str,
        direction: str,
        raw: object,
        errors: Sequence[Mapping[str, Any]],
    ) -> None:
        self.node_id = node_id
        self.direction = direction
        self.raw = raw
        self.errors: list[Mapping[str, Any]] = list(errors)
        listed = "; ".join(
            f"{_loc(e)}: {e.get('msg', '')}" for e in self.errors[:_MAX_LISTED_ERRORS]
        )
        more = len(self.errors) - _MAX_LISTED_ERRORS
        if more > 0:
            listed += f"; ... and {more} more"
        super().__init__(f"Contract violation for '{node_id}' ({direction}): {listed}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.node_id, self.direction, self.raw, self.errors))


StepViolation = ContractViolation

_USAGE_HINT = (
    "; a node reports usage by returning (dict, tokens), (dict, input_tokens, model) or "
    "(dict, input_tokens, output_tokens, model)"
)


class BoundaryValidator:
    """Validates data crossing a node boundary against the contract's schema."""

    __slots__ = ()

    def __call__(self, contract: NodeContract, direction: str, raw: object) -> BaseModel:
        """The validated model; an instance of the schema already is one and is returned as is."""
        if direction == "input":
            schema = contract.input_schema
        elif direction == "output":
            schema = contract.output_schema
        else:
            raise StromaValueError(f"direction must be 'input' or 'output', got {direction!r}")
        if isinstance(raw, schema):
            return raw
        data: object
        if isinstance(raw, BaseModel):
            data = raw.model_dump()
        elif isinstance(raw, Mapping):
            data = dict(raw)
        else:
            msg = (
                f"expected a dict or a {schema.__name__} instance, "
                f"got {type(raw).__name__}"
            )
            if isinstance(raw, tuple):
                msg += _USAGE_HINT
            error = {"type": "model_type", "loc": (), "msg": msg, "input": raw}
            raise ContractViolation(contract.node_id, direction, raw, [error])
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            raise ContractViolation(contract.node_id, direction, data, errors) from exc


_validate = BoundaryValidator()


class ContractRegistry:
    """The contracts of a pipeline's nodes, by node id."""

    __slots__ = ("_contracts", "version")

    def __init__(self) -> None:
        self._contracts: dict[str, NodeContract] = {}
        self.version = 0  # bumped on every register, so compiled plans know to recompile

    def register(self, contract: NodeContract) -> None:
        """Add a contract, replacing any earlier one with the same node id."""
        if not isinstance(contract, NodeContract):
            raise StromaTypeError(
                f"register() expects a NodeContract, got {type(contract).__name__}; build "
                "one with NodeContract(node_id=..., input_schema=..., output_schema=...)"
            )
        self._contracts[contract.node_id] = contract
        self.version += 1

    def get(self, node_id: str) -> NodeContract:
        try:
            return self._contracts[node_id]
        except KeyError:
            known = ", ".join(repr(k) for k in self._contracts) or "none"
            raise StromaKeyError(
                f"no contract registered for node {node_id!r} (registered: {known}); "
                "register one with registry.register(NodeContract(...)) or @runner.node(...)"
            ) from None

    def validate_input(self, node_id: str, raw: object) -> BaseModel:
        return _validate(self.get(node_id), "input", raw)

    def validate_output(self, node_id: str, raw: object) -> BaseModel:
        return _validate(self.get(node_id), "output", raw)

    def schemas(self) -> set[type[BaseModel]]:
        """Every input and output schema of the registered contracts."""
        out: set[type[BaseModel]] = set()
        for c in self._contracts.values():
            out.add(c.input_schema)
            out.add(c.output_schema)
        return out

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._contracts

    def __iter__(self) -> Iterator[NodeContract]:
        return iter(list(self._contracts.values()))

    def __len__(self) -> int:
        return len(self._contracts)

    def __repr__(self) -> str:
        return f"ContractRegistry({list(self._contracts)!r})"
