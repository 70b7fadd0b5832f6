"""Schema references (``module:qualname``) and the safe way to turn one back into a class.

A store writes ``_schema_ref(type(state))`` beside a checkpoint. Reading it back must never
import whatever a tampered store names (``os:system``), so stroma keeps a set of *declared*
schemas (every schema of a registered contract, a compiled plan, or a state this process
saved) and ``resolve_declared`` only ever answers from that set. ``_resolve_schema`` is the
older, trusting resolver that custom backends may still call.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import importlib
import json
import math
import re
import types
import typing
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from stroma.errors import (
    StromaAttributeError,
    StromaImportError,
    StromaModuleNotFoundError,
    StromaTypeError,
    StromaValueError,
    UnsafeSchemaRef,
)

__all__ = (
    "EXACT_SCHEMAS",
    "_resolve_schema",
    "_schema_ref",
    "declare_schema",
    "declare_schemas",
    "declared_schemas",
    "first_error",
    "json_schema_problems",
    "read_state",
    "reads_back",
    "resolve_declared",
    "serialization_problem",
    "state_json",
)

_DECLARED: dict[str, type[BaseModel]] = {}
# module:qualname, where a qualname may name a parametrized generic (Page[Item, int]).
_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_<>][\w.<>\[\], ]*$")


def first_error(e: ValidationError) -> str:
    """A validation error in a line: how many errors, and the first one's place and
    message (``2 error(s), first: x: Field required``)."""
    first = e.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "(the state)"
    return f"{e.error_count()} error(s), first: {where}: {first.get('msg', '')}"


def _schema_ref(cls: type) -> str:
    """``"module:qualname"`` of a class: what a store writes beside a checkpoint."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_schema(ref: str) -> type[BaseModel]:
    """Import the class a ``module:qualname`` reference names (nested qualnames work).

    This trusts the reference. Stores that read references written by someone else
    should use ``resolve_declared`` instead.
    """
    if not isinstance(ref, str) or ":" not in ref:
        raise StromaValueError(f"schema reference {ref!r} must look like 'package.module:QualName'")
    module_name, qualname = ref.split(":", 1)
    fix = ("a reference must name the model class of the stored state "
           "('package.module:QualName'), importable in this process")
    try:
        obj: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise StromaModuleNotFoundError(
            f"schema reference {ref!r}: module {module_name!r} cannot be imported ({exc}); "
            f"{fix}", name=exc.name,
        ) from exc
    except ImportError as exc:
        raise StromaImportError(
            f"schema reference {ref!r}: importing module {module_name!r} failed ({exc}); "
            f"{fix}", name=exc.name,
        ) from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise StromaAttributeError(
                f"schema reference {ref!r}: {obj!r} has no attribute {part!r}; {fix}"
            ) from exc
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        raise StromaTypeError(
            f"resolved schema is not a BaseModel: the schema reference {ref!r} names "
            f"{obj!r}, which is not a pydantic BaseModel class; a reference must name the "
            "model class of the stored state ('package.module:QualName')"
        )
    return obj


def declare_schema(cls: type[BaseModel]) -> None:
    """Allow ``resolve_declared`` to answer with this class."""
    _DECLARED[_schema_ref(cls)] = cls  # the latest definition wins (reloads, local classes)


def declare_schemas(classes: Iterable[type[BaseModel]]) -> None:
    for cls in classes:
        declare_schema(cls)


def declared_schemas() -> dict[str, type[BaseModel]]:
    return dict(_DECLARED)


def resolve_declared(ref: object, *, source: str = "store") -> type[BaseModel]:
    """The declared schema a reference names, imported never; anything else is refused."""
    if not isinstance(ref, str) or not _REF.match(ref):
        raise UnsafeSchemaRef(repr(ref) if not isinstance(ref, str) else ref, source=source)
    cls = _DECLARED.get(ref)
    if cls is None:
        raise UnsafeSchemaRef(ref, source=source)
    return cls


def state_json(state: BaseModel) -> bytes:
    """A state's JSON, as ``model_dump_json`` writes it (bytes), except for floats that are
    not finite: JSON has no infinity, and pydantic writes null, which would not read back
    as a float; here they are ``NaN``, ``Infinity`` and ``-Infinity``, as Python's json
    writes them and as both it and ``model_validate_json`` read them back."""
    data: bytes = state.__pydantic_serializer__.to_json(state)
    if b"null" in data:
        dumped = state.model_dump(mode="json")
        if _has_nonfinite(dumped):
            return json.dumps(dumped, separators=(",", ":"), ensure_ascii=False).encode()
    return data


def read_state(schema: type[BaseModel], data: bytes | str) -> BaseModel:
    """A state from the JSON text ``state_json`` wrote: fields by name, as it writes them,
    or by alias (a field whose alias the model validates by, without ``populate_by_name``,
    reads back all the same)."""
    model: BaseModel = schema.__pydantic_validator__.validate_json(
        data, by_alias=True, by_name=True)
    return model


# Schemas whose JSON, as state_json writes it, reads back (read_state) as the same state.
EXACT_SCHEMAS: set[type[BaseModel]] = set()
_INEXACT: set[type[BaseModel]] = set()
_SCALARS = frozenset((str, int, float, bool, type(None), bytes, datetime.datetime,
                      datetime.date, datetime.time, datetime.timedelta, decimal.Decimal,
                      uuid.UUID))
# Scalars JSON writes as text: a union of two of them reads back as whichever comes first.
_AS_TEXT = frozenset((str, bytes, datetime.datetime, datetime.date, datetime.time,
                      datetime.timedelta, decimal.Decimal, uuid.UUID))
_CONTAINERS = frozenset((list, set, frozenset, tuple, dict))
# model_config settings that change nothing in a state's JSON or in how it reads back.
_NEUTRAL_CONFIG = frozenset((
    "title", "frozen", "extra", "populate_by_name", "validate_by_name", "validate_by_alias",
    "protected_namespaces", "defer_build", "json_schema_extra", "use_attribute_docstrings",
    "revalidate_instances", "validate_assignment", "str_strip_whitespace", "str_to_lower",
    "str_to_upper", "str_min_length", "str_max_length", "alias_generator",
    "loc_by_alias", "hide_input_in_errors", "json_schema_mode_override",
    "regex_engine", "validation_error_cause", "coerce_numbers_to_str", "strict",
    "cache_strings", "arbitrary_types_allowed", "from_attributes",
))


def reads_back(schema: type[BaseModel]) -> bool:
    """Whether a state of ``schema`` is sure to read back from its JSON as itself.

    Conservative, and worked out once per schema: no validators or serializers of the
    user's (a validator that appends to a value would apply again on every read), no
    excluded, computed or private fields, no extra fields kept, and only field types whose
    JSON reads back as the same value (``Any``, a bare ``dict`` or a union of two types
    written as text do not). A live run goes on with a state of any other schema as its
    JSON reads back, which is what a resume or a replay of the run goes on with.
    """
    if schema in EXACT_SCHEMAS:
        return True
    if schema in _INEXACT:
        return False
    EXACT_SCHEMAS.add(schema)  # (while it is looked at: a model that refers to itself)
    try:
        exact = _exact_model(schema)
    except Exception:  # (a schema this cannot look into: it is taken as inexact)
        exact = False
    if not exact:
        EXACT_SCHEMAS.discard(schema)
        _INEXACT.add(schema)
    return exact


def _exact_model(schema: type[BaseModel]) -> bool:
    found = schema.__pydantic_decorators__
    if (found.validators or found.field_validators or found.root_validators
            or found.model_validators or found.field_serializers or found.model_serializers
            or found.computed_fields or schema.__private_attributes__):
        return False
    config = schema.model_config
    if config.get("extra") == "allow" or not _NEUTRAL_CONFIG.issuperset(config):
        return False
    for field in schema.model_fields.values():
        if field.exclude or not _exact_metadata(field.metadata):
            return False
        if not _exact_type(field.annotation):
            return False
    return True


def _exact_metadata(metadata: Iterable[Any]) -> bool:
    """Constraints (``Gt``, ``MaxLen``) change nothing; validators and serializers do."""
    return not any(type(m).__module__.startswith(("pydantic.functional", "pydantic.types"))
                   and not type(m).__name__.endswith(("Strict", "Constraints"))
                   for m in metadata)


def _exact_type(tp: Any) -> bool:
    if tp in _SCALARS:
        return True
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return True
        if issubclass(tp, BaseModel):
            return reads_back(tp)
        return False  # Any, object, an arbitrary type
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _exact_metadata(args[1:]) and _exact_type(args[0])
    if origin is typing.Literal:
        return all(type(a) in (str, int, bool, type(None)) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in args if a is not type(None)]
        as_text = [a for a in members if a in _AS_TEXT or (
            isinstance(a, type) and issubclass(a, enum.Enum))]
        models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
        return len(as_text) <= 1 and len(models) <= 1 and all(map(_exact_type, members))
    if origin in _CONTAINERS and args:
        if origin is dict and (args[0] not in _SCALARS or args[0] is bool):
            return False
        return all(a is Ellipsis or _exact_type(a) for a in args)
    return False


def _has_nonfinite(value: Any) -> bool:
    if type(value) is float:
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nonfinite(v) for v in value)
    return False


def serialization_problem(state: BaseModel, exc: BaseException) -> str:
    """Why ``state_json(state)`` raised ``exc``, naming the field whose value is at fault."""
    what = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    if isinstance(exc, RecursionError):
        what = "nested too deeply to be written as JSON"
    for name in type(state).model_fields:
        try:
            state.__pydantic_serializer__.to_json(state, include={name})
        except Exception:
            return f"field {name!r} of {type(state).__name__} cannot be written as JSON ({what})"
    return f"{type(state).__name__} cannot be written as JSON ({what})"


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),),
}


def json_schema_problems(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """What in ``value`` does not fit the JSON Schema ``schema`` (the subset pydantic
    writes for plain models: types, properties, required, items, enum, const, anyOf,
    $ref to $defs, bounds, lengths and patterns), each named by its field; [] when it
    fits. For checking a payload against a schema whose class this process does not
    have."""
    return _problems(value, schema, schema.get("$defs", {}), where)


_BOUNDS: tuple[tuple[str, Callable[[Any, Any], bool], str], ...] = (
    ("minimum", lambda v, b: v >= b, ">="), ("maximum", lambda v, b: v <= b, "<="),
    ("exclusiveMinimum", lambda v, b: v > b, ">"), ("exclusiveMaximum", lambda v, b: v < b, "<"),
)


def _bounds(value: Any, schema: dict[str, Any], at: str) -> list[str]:
    """Bounds, lengths and patterns (what Field(gt=, max_length=, pattern=) writes)."""
    found: list[str] = []
    if isinstance(value, int | float) and not isinstance(value, bool):
        for key, holds, word in _BOUNDS:
            bound = schema.get(key)
            if isinstance(bound, int | float) and not holds(value, bound):
                found.append(f"{at}: expected a number {word} {bound}, got {value!r}")
    sizes: dict[type, tuple[str, str, str]] = {
        str: ("minLength", "maxLength", "characters"), list: ("minItems", "maxItems", "items")}
    sized = sizes.get(type(value))
    if sized is not None:
        low, high, unit = sized
        if isinstance(schema.get(low), int) and len(value) < schema[low]:
            found.append(f"{at}: expected at least {schema[low]} {unit}, got {len(value)}")
        if isinstance(schema.get(high), int) and len(value) > schema[high]:
            found.append(f"{at}: expected at most {schema[high]} {unit}, got {len(value)}")
    pattern = schema.get("pattern")
    if isinstance(value, str) and isinstance(pattern, str):
        try:
            matched = re.search(pattern, value) is not None
        except re.error:
            matched = True  # (a pattern Python's re does not read: the run checks it)
        if not matched:
            found.append(f"{at}: expected text matching {pattern!r}, got {value!r}")
    return found


def _problems(value: Any, schema: dict[str, Any], defs: dict[str, Any], where: str) -> list[str]:
    at = where or "(the payload)"
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _problems(value, defs.get(ref.rsplit("/", 1)[1], {}), defs, where)
    if "anyOf" in schema:
        options = [_problems(value, option, defs, where) for option in schema["anyOf"]]
        return [] if any(not o for o in options) else min(options, key=len)
    if "enum" in schema and value not in schema["enum"]:
        return [f"{at}: expected one of {schema['enum']!r}, got {value!r}"]
    if "const" in schema and value != schema["const"]:
        return [f"{at}: expected {schema['const']!r}, got {value!r}"]
    kind = schema.get("type")
    if isinstance(kind, str) and kind in _JSON_TYPES:
        ok = isinstance(value, _JSON_TYPES[kind]) and not (
            kind in ("integer", "number") and isinstance(value, bool))
        if not ok:
            return [f"{at}: expected {kind}, got {value!r}"]
    found = _bounds(value, schema, at)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                found.append(f"{where + '.' if where else ''}{name}: field required")
        for name, sub in properties.items():
            if name in value:
                found.extend(_problems(value[name], sub, defs,
                                       f"{where + '.' if where else ''}{name}"))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found.extend(_problems(item, schema["items"], defs, f"{where}[{i}]"))
    return found
