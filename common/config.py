"""The command line: one dataclass per entry point with argparse generated from it, and the exit-code rule.

A field (``option``) gives its option's default, help and choices, its type how it is parsed. Booleans
accept what wandb and people write: ``--flag``, ``--no-flag``, ``--flag=True``, ``--flag false``.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import operator
import sys
import typing
from typing import Any, Callable, Iterable


class UserError(Exception):
    """A failure the user can fix (missing data, a damaged file, a diverged run); the message says how."""


def cli_main(parse: Callable, work: Callable, argv: list[str] | None = None) -> int:
    """Every command's ``main``. Exit 2 when the options are wrong (nothing was read or run), 1 when
    the work fails for a reason the user can fix (also a file or folder that cannot be written, a full
    disk), each with one ``error:`` line on stderr, 130 after Ctrl-C; anything else is a bug and keeps its
    traceback."""
    try:
        config = parse(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        work(config)
    except (ValueError, UserError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        if error.filename is None and not full and error.errno not in (errno.EROFS, errno.EIO):
            raise  # not about a file (e.g. a network error): the code should have said what to do
        where = "" if error.filename is None else f"{error.filename}: "
        hint = "free some space" if full else "check the path and its permissions"
        print(f"error: {where}{error.strerror or error}; {hint}, then run the command again", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # what finished is saved: last.pt, the split, a study's steps
        print("error: interrupted (Ctrl-C); run it again to continue (a run: with --resume)", file=sys.stderr)
        return 130
    return 0


_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}


def parse_bool(text: str | bool) -> bool:
    """Parse a boolean the way wandb and shells spell it; anything else is an error."""
    lowered = str(text).strip().lower()
    if lowered not in _TRUE | _FALSE:
        raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")
    return lowered in _TRUE


def _int_or_str(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def _int_list(text: str) -> int | list[int]:
    """'5' -> 5; '3,5,5,7,7' or '[3, 5, 5]' -> [3, 5, 5]: one value, or one per block."""
    cleaned = text.strip().strip("[]()")
    parts = [p for p in cleaned.replace(" ", "").split(",") if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        message = f"expected an integer or a comma list of integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values[0] if len(values) == 1 and "," not in cleaned else values


def _list_of(item: type):
    def parse_list(text: str) -> list:
        return [item(p) for p in text.strip().strip("[]()").replace(" ", "").split(",") if p]

    return parse_list


# How a field's type is parsed: the types config dataclasses use (X | None adds "none" to each).
PARSERS = {bool: parse_bool, int: int, float: float, str: str, int | str: _int_or_str}
PARSERS.update({int | list[int]: _int_list, list[int]: _list_of(int), list[str]: _list_of(str)})


def _parser_for(tp: Any):
    """The argparse ``type=`` for a dataclass field annotation; ``X | None`` also takes none or null."""
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(inner) == len(typing.get_args(tp)):
        if tp not in PARSERS:
            raise TypeError(f"no option parser for field type {tp!r}")
        return PARSERS[tp]
    parse = _parser_for(functools.reduce(operator.or_, inner))

    def parse_optional(text: str):
        return None if text.strip().lower() in {"none", "null", ""} else parse(text)

    return parse_optional


def option(default: Any, help: str, **metadata) -> Any:
    """A config dataclass field that ``add_dataclass_args`` makes an option of: its default, its help and
    any other ``metadata`` (``choices``, ``cli=False``). A list default is copied for each config."""
    metadata = {"help": help, **metadata}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """Add one option per field of ``cls`` (a dataclass) to ``parser``, in a group of their own."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title or cls.__name__)
    for field in dataclasses.fields(cls):
        if not field.init or field.metadata.get("cli") is False:
            continue
        tp, flag = hints[field.name], f"--{field.name}"
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        # %(default)s: argparse fills it in when --help prints, after any parser.set_defaults.
        help_text = " ".join(filter(None, [field.metadata.get("help"), "(default: %(default)s)"]))
        common = dict(type=_parser_for(tp), default=default, help=help_text)
        if bool in (tp, *typing.get_args(tp)):  # --flag, --flag=true, --flag false and --no-flag
            group.add_argument(flag, nargs="?", const=True, metavar="BOOL", **common)
            negation = dict(dest=field.name, action="store_false", help=argparse.SUPPRESS)
            group.add_argument(f"--no-{field.name}", **negation)
        else:
            choices = field.metadata.get("choices")
            metavar = None if choices is None else "{" + ",".join(map(str, choices)) + "}"
            group.add_argument(flag, choices=choices, metavar=metavar, **common)


def from_namespace(cls: type, namespace: argparse.Namespace | dict):
    """Build ``cls`` from parsed options, ignoring options that belong to other dataclasses."""
    values = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in values.items() if k in names})


def to_cli(config: Any, names: Iterable[str] | None = None) -> list[str]:
    """The ``--name=value`` arguments that reproduce ``config`` (for printing ready-to-run commands)."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    selected = data if names is None else {n: data[n] for n in names}
    out = []
    for key, value in selected.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        out.append(f"--{key}={value}")
    return out
