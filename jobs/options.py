"""Command-line options made from the job specs' own fields: one place to add a flag.

A spec field (``jobs/spec.py``, ``jobs/serve.py``, ``jobs/optimize.py``) is its flag:
``batch_rows`` is ``--batch-rows``, its type (a ``Literal`` of the constants the models
use becomes a ``click.Choice``), its default and its description as help. ``Flag``
metadata says what a type cannot: another flag name, a parser for sizes or ranges,
that the value is a path. A validation error of the spec names the same flag.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import click
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from lmbatch.errors import Loc, UserModel, from_validation


@dataclass(frozen=True)
class Flag:
    """How a spec field appears on the command line, beyond its type."""

    name: str | None = None  # the flag, where it is not --field-name
    parse: Callable[[str], Any] | None = None  # text -> value; ValueError: refused
    metavar: str | None = None
    path: bool = False  # a file, directory or URI: checked for a cluster on submit
    hidden: bool = False  # set by the command itself, not a flag of its own


class Spec(UserModel):
    """A job spec: built from flags (``from_flags``) or a submission's JSON
    (``from_json``), every mistake one line naming its flag."""

    @classmethod
    def from_flags(cls, **flags: Any):
        try:
            return cls.model_validate(flags)
        except ValidationError as e:
            raise from_validation(e, cls.flag_at) from None

    @classmethod
    def from_json(cls, text: str):
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            raise from_validation(e, cls.flag_at) from None

    @classmethod
    def flag_at(cls, loc: Loc) -> str:
        field = cls.model_fields.get(str(loc[0])) if loc else None
        return flag_name(str(loc[0]), field) if field else "spec"

    @classmethod
    def path_fields(cls) -> dict[str, str]:
        """field -> flag, for every field that holds paths."""
        return {
            name: flag_name(name, field)
            for name, field in cls.model_fields.items()
            if _flag(field).path
        }


def spec_options(spec: type[Spec]) -> Callable[[Callable], Callable]:
    """Decorate a click command with one option per field of ``spec``."""

    def decorate(command: Callable) -> Callable:
        for name, field in reversed(spec.model_fields.items()):
            if not _flag(field).hidden:
                command = option(name, field)(command)
        return command

    return decorate


def option(name: str, field: FieldInfo) -> Callable[[Callable], Callable]:
    flag = _flag(field)
    kind, multiple = _click_type(field.annotation)
    multiple = multiple and flag.parse is None  # a parser takes the whole text
    required = field.is_required()
    default = None if required else field.default
    kwargs: dict[str, Any] = dict(
        required=required,
        default=default,
        help=field.description,
        metavar=flag.metavar,
        multiple=multiple,
    )
    if kind is bool:
        kwargs.update(is_flag=True, default=bool(default))
    elif flag.parse is not None:
        kwargs.update(callback=_parsed(flag.parse, default), default=None)
    else:
        kwargs["type"] = kind
    kwargs["show_default"] = default not in (None, False, ())
    return click.option(flag_name(name, field), name, **kwargs)


def flag_name(name: str, field: FieldInfo) -> str:
    return _flag(field).name or "--" + name.replace("_", "-")


def _flag(field: FieldInfo) -> Flag:
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def _click_type(annotation: Any) -> tuple[Any, bool]:
    """(click type, multiple) for a field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is (
        typing.Union
    ):
        return _click_type(args[0])
    if typing.get_origin(annotation) is typing.Annotated:
        return _click_type(args[0])
    if typing.get_origin(annotation) is Literal:
        return click.Choice([str(a) for a in args]), False
    if typing.get_origin(annotation) is tuple and args[-1] is Ellipsis:
        return _click_type(args[0])[0], True
    return annotation, False


def _parsed(parse: Callable[[str], Any], default: Any) -> Callable:
    def callback(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return callback


SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: str) -> int:
    """'2GiB', '512MB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.e+]+)\s*([a-zA-Z]*)\s*", value)
    unit = match and match.group(2).lower()
    if not match or unit not in SIZE_UNITS:
        raise ValueError(f"expected a size like 2GiB or 512MB, got {value!r}")
    try:
        return int(float(match.group(1)) * SIZE_UNITS[unit])
    except ValueError:
        raise ValueError(f"expected a size like 2GiB, got {value!r}") from None


def parse_range(value: str) -> tuple[int, int]:
    """'2' -> (2, 2); '1,4' -> (1, 4)."""
    try:
        parts = [int(p) for p in value.split(",")]
    except ValueError:
        raise ValueError(f"expected MIN or MIN,MAX, got {value!r}") from None
    if len(parts) not in (1, 2):
        raise ValueError(f"expected MIN or MIN,MAX, got {value!r}")
    return (parts[0], parts[-1])


def parse_columns(value: str) -> tuple[str, ...]:
    """'url,lang' -> ('url', 'lang'); '*' -> ('*',)."""
    columns = tuple(c.strip() for c in value.split(",") if c.strip())
    if not columns:
        raise ValueError(f"expected COL[,COL...] or *, got {value!r}")
    return columns


def parse_auto_int(value: str) -> int | None:
    """'auto' -> None; '3' -> 3."""
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"expected auto or a whole number >= 1, got {value!r}")
    return int(value)
