"""Named tuples that are values of their kind: what effects, events and plan instructions
are made of.

A named tuple is the cheapest immutable value Python makes, to create and to define (a
tenth of what a generated class costs at import), but it equals any tuple with the same
items. ``named_value`` gives one the equality of a value class instead: equal only to a
value of its own class, with some fields (live objects) left out of comparisons and some
left out of its ``repr``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ("named_value",)

_T = TypeVar("_T")


def named_value(
    *, live: tuple[str, ...] = (), unshown: tuple[str, ...] = (), eq: bool = True
) -> Callable[[type[_T]], type[_T]]:
    """Make a named tuple a value of its kind: equal only to one of its own class, on
    every field but the ``live`` ones (live objects that a log does not hold), hashed on
    those same fields, and shown without the ``unshown`` ones. ``eq=False`` keeps the
    class's own ``__eq__`` and ``__hash__``. ``_compared`` lists the compared fields (what
    a replay divergence reports on)."""

    def make(cls: type[_T]) -> type[_T]:
        fields: tuple[str, ...] = cls._fields  # type: ignore[attr-defined]
        keep = tuple(i for i, name in enumerate(fields) if name not in live)
        cls._compared = tuple(fields[i] for i in keep)  # type: ignore[attr-defined]
        if eq:
            if len(keep) == len(fields):
                def __eq__(self: Any, other: Any) -> bool:
                    return type(other) is type(self) and tuple.__eq__(self, other)

                def __hash__(self: Any) -> int:
                    return tuple.__hash__(self)
            else:
                part = operator.itemgetter(*keep)

                def __eq__(self: Any, other: Any) -> bool:
                    return type(other) is type(self) and bool(part(self) == part(other))

                def __hash__(self: Any) -> int:
                    return hash(part(self))

            def __ne__(self: Any, other: object) -> bool:
                return not __eq__(self, other)

            methods: dict[str, Callable[..., Any]] = {
                "__eq__": __eq__, "__ne__": __ne__, "__hash__": __hash__}
            for name, method in methods.items():
                setattr(cls, name, method)
        if unshown:
            shown = tuple((i, name) for i, name in enumerate(fields) if name not in unshown)

            def __repr__(self: Any) -> str:
                inner = ", ".join(f"{name}={self[i]!r}" for i, name in shown)
                return f"{type(self).__name__}({inner})"

            cls.__repr__ = __repr__  # type: ignore[method-assign]
        return cls

    return make
