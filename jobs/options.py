"""Command-line options made from the job specs' own fields: one place to add a flag.

A spec field (``jobs/spec.py``, ``jobs/serve.py``, ``jobs/optimize.py``) is its flag:
``batch_rows`` is ``--batch-rows``, its type (a ``Literal`` of the constants the models
use becomes a ``click.Choice``), its default and its description as help. ``Flag``
metadata says what a type cannot: another flag name, a parser for sizes or ranges,
that the value is a path. A validation error of the spec names the same flag.

``--spec FILE`` gives the same flags as YAML (``batch-tokens: 4096``): a job kept
beside its data and versioned with it. Flags given on the command line win over the
file, the file over the defaults.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import click
from click.core import ParameterSource
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from lmbatch.actors.storage import read_yaml
from lmbatch.errors import Loc, UserError, UserModel, from_validation


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
            raise cls._with_choices(e) from None

    @classmethod
    def _with_choices(cls, e: ValidationError) -> UserError:
        """pydantic's first error; a required choice (``--task``) missing says
        what it may be."""
        error = from_validation(e, cls.flag_at)
        first = e.errors()[0]
        field = cls.model_fields.get(str(first["loc"][0])) if first["loc"] else None
        if first["type"] != "missing" or field is None:
            return error
        if typing.get_origin(field.annotation) is not Literal:
            return error
        choices = ", ".join(map(str, typing.get_args(field.annotation)))
        return UserError(error.where, f"required: {choices}")

    @classmethod
    def from_command(cls, flags: dict[str, Any]):
        """The spec that a command's flags and its ``--spec`` file describe."""
        path = flags.pop("spec", None)
        values = read_spec_file(path, cls) if path else {}
        given = given_flags(flags)
        try:
            return cls.from_flags(**{**values, **given})
        except UserError as e:
            from_file = {cls.flag_at((name,)) for name in values.keys() - given.keys()}
            if e.where in from_file:
                raise UserError(e.where, f"{e.message} (in {path})") from None
            raise

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
    """Decorate a click command with one option per field of ``spec``, and
    ``--spec`` (read by ``Spec.from_command``)."""

    def decorate(command: Callable) -> Callable:
        for name, field in reversed(spec.model_fields.items()):
            if not _flag(field).hidden:
                command = option(name, field)(command)
        return click.option(
            "--spec",
            "spec",
            metavar="FILE",
            help="YAML of this command's flags (batch-tokens: 4096, input: [a.csv]),"
            " a path or URI; flags given here win over it.",
        )(command)

    return decorate


def given_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags the command line (or an environment variable) set: the rest are
    click's copies of the spec's defaults, which a --spec file overrides."""
    context = click.get_current_context(silent=True)
    if context is None:  # called as a function: every value was given
        return flags
    unset = (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    return {
        k: v for k, v in flags.items() if context.get_parameter_source(k) not in unset
    }


def read_spec_file(path: str, spec: type[Spec]) -> dict[str, Any]:
    """A YAML mapping of this command's flags, without their dashes (``input``,
    ``batch-tokens`` or ``batch_tokens``), to values as a flag takes them or as YAML
    types them (``actor-memory: 2GiB``, ``input: [a.csv, b.csv]``).

    Raises:
        UserError: naming ``--spec``, the file and the key.
    """
    data = read_yaml(path, "--spec")
    if not isinstance(data, dict):
        raise UserError("--spec", f"{path} must map flags to values (task: embed)")
    names = _file_keys(spec)
    values = {}
    for key, value in data.items():
        name = names.get(str(key).replace("_", "-"))
        if name is None:
            close = difflib.get_close_matches(str(key).replace("_", "-"), names, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError("--spec", f"{path}: no flag --{key} here{hint}")
        values[name] = _file_value(spec.model_fields[name], value, f"{path}: {key}")
    return values


def _file_keys(spec: type[Spec]) -> dict[str, str]:
    """A spec file's keys (its flags without dashes, or its field names, with ``-``
    for ``_``) -> the spec's fields."""
    keys = {}
    for name, field in spec.model_fields.items():
        if not _flag(field).hidden:
            keys[flag_name(name, field).removeprefix("--")] = name
            keys.setdefault(name.replace("_", "-"), name)
    return keys


def _file_value(field: FieldInfo, value: Any, where: str) -> Any:
    """A value from a spec file as its flag's own would be: text through the flag's
    parser, a list as the tuple a repeated flag gives, one path as a list of one."""
    flag = _flag(field)
    if flag.parse is not None and isinstance(value, str | int | float):
        try:
            return flag.parse(str(value))
        except ValueError as e:
            raise UserError("--spec", f"{where}: {e}") from None
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str) and _click_type(field.annotation)[1]:
        return (value,)
    return value


def option(name: str, field: FieldInfo) -> Callable[[Callable], Callable]:
    flag = _flag(field)
    kind, multiple = _click_type(field.annotation)
    multiple = multiple and flag.parse is None  # a parser takes the whole text
    required = field.is_required()  # here or in --spec: the spec says which is missing
    default = None if required else field.default
    help_text = field.description or ""
    if required:
        help_text = f"{help_text} Required, here or in --spec.".strip()
    kwargs: dict[str, Any] = dict(
        default=default,
        help=help_text,
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
