"""A user's mistake, said in one line: the one exception type, and the base of every
model a user writes (job specs, recipe steps).

Jobs, optimize and the actors all raise ``UserError``; the CLI prints it as a single
line and exits non-zero, and anything else is a bug and keeps its traceback. What a
user writes is a pydantic model (``UserModel``): an unknown key or a value of the
wrong type is refused by pydantic, and ``from_validation`` turns its first error into
one ``UserError`` named by the path of what was wrong (``--batch-tokens``,
``steps[2].prune.sparsity``).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, ValidationError

Loc = tuple[str | int, ...]


class UserError(ValueError):
    """A mistake in the user's flags, files or model, named in ``where``.

    Args:
        where: the flag, field or file at fault, e.g. ``--input`` or ``data.csv``.
        message: what is wrong and, where useful, how to fix it.
    """

    def __init__(self, where: str, message: str) -> None:
        # One line, always: a library's message quoted here may run on (PyYAML's
        # marks, a server's body); its first line says what went wrong.
        message = message.strip().split("\n", 1)[0].rstrip()
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message

    def __reduce__(self) -> tuple:
        # Ray pickles exceptions raised in tasks; keep both arguments across the trip.
        return (type(self), (self.where, self.message))


class FieldError(ValueError):
    """Raised in a model validator about one of the model's fields (or a deeper
    path), so that the error names that field rather than the whole model."""

    def __init__(self, field: str | Loc, message: str) -> None:
        super().__init__(message)
        self.loc: Loc = (field,) if isinstance(field, str) else field


class UserModel(BaseModel):
    """What a user writes: unknown keys refused, no silent type coercion (no "3"
    for 3, no True for 1), immutable once checked."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def from_validation(exc: ValidationError, where: Callable[[Loc], str]) -> UserError:
    """pydantic's first error as a ``UserError`` at ``where(location)``."""
    error = exc.errors()[0]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, UserError):
        return cause
    loc = tuple(part for part in error["loc"] if part != "[key]")
    if isinstance(cause, FieldError):
        return UserError(where(loc + cause.loc), str(cause))
    return UserError(where(loc), describe(error))


def describe(error: dict) -> str:
    """pydantic's message, shortened where a shorter one says as much."""
    kind, given = error["type"], error.get("input")
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "literal_error":
        return f"unknown {given!r}; use {error['ctx']['expected']}"
    if kind in ("tuple_type", "list_type"):
        return f"expected a list, got {given!r}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        expected = kind.split("_")[0]
        return f"expected {expected}, got {given!r}"
    message = error["msg"]
    if message.startswith("Value error, "):
        return message.removeprefix("Value error, ")
    return f"{message[0].lower()}{message[1:]}, got {given!r}"


def dotted(loc: Loc) -> str:
    """('steps', 2, 'prune', 'sparsity') -> 'steps[2].prune.sparsity'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


def find_user_error(exc: BaseException) -> UserError | None:
    """Walk the cause chain (Ray wraps task errors) to its innermost UserError, if
    one is there: Ray's wrapper of a task's UserError is a UserError too, but says
    the task's traceback, not the one line."""
    seen: set[int] = set()
    found = None
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            found = exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__
    return found
