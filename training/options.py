"""Command-line options generated from the config dataclasses, so each default, type and help
text lives in one place: the dataclass field (`option(...)`), read here by `sgz train`."""

import argparse
import dataclasses
import shlex
import types
import typing
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default unless it is None or False (the help text then says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def option(
    default: Any = None,
    help: str = "",
    *,
    flag: str | None = None,
    cli: bool = True,
    default_factory=None,
    **argparse_kw,
) -> Any:
    """A dataclass field that is also a command-line option. `flag`: the option's name when it
    is not the field's; `cli=False`: not an option; `argparse_kw`: e.g. choices, metavar."""
    meta = {"help": help, "flag": flag, "cli": cli, "argparse": argparse_kw}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def flag_of(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def _scalar_type(annotation) -> type:
    """int for `int`, `int | None`, `Optional[int]`; bool, float, str alike."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (t,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return t
    return annotation


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """One option per field of `cls` (see `option`); bool fields are switches off by default."""
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        t = _scalar_type(hints[f.name])
        kw = {"dest": f.name, "help": f.metadata.get("help", ""), **f.metadata.get("argparse", {})}
        if t is bool:
            if f.default is not False:
                raise TypeError(f"{cls.__name__}.{f.name}: a switch must default to False")
            parser.add_argument(flag_of(f), action="store_true", **kw)
        else:
            parser.add_argument(flag_of(f), type=t, default=f.default, **kw)


def from_args(cls, args: argparse.Namespace) -> dict:
    """The values of `cls`'s options in parsed `args`, in field order."""
    return {f.name: getattr(args, f.name) for f in cli_fields(cls)}


def format_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else shlex.quote(str(v))


def to_args(cls, values: dict) -> list[str]:
    """The options that give `values` from `cls`'s defaults (the inverse of `from_args`)."""
    out = []
    for f in cli_fields(cls):
        v = values.get(f.name, f.default)
        if v == f.default:
            continue
        out += [flag_of(f)] if v is True else [flag_of(f), format_value(v)]
    return out
