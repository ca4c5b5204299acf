"""The command line: one dataclass per entry point with argparse generated from it, and the exit-code rule.

A field's type decides how its option is parsed; its ``metadata`` may carry ``help`` and
``choices``. Booleans accept every spelling wandb and people use: ``--flag``, ``--no-flag``,
``--flag=True``, ``--flag=false``, ``--flag 1``. Options are grouped by the dataclass a field comes
from, so ``--help`` reads as "model", "training", ... sections.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import types
import typing
from typing import Any, Callable, Iterable


class UserError(Exception):
    """A failure the user can fix (missing data, a damaged file, a diverged run); the message says how."""


def cli_main(parse: Callable[[list[str] | None], Any], work: Callable[[Any], Any], argv: list[str] | None = None) -> int:
    """Every command's ``main``. Exit 2 when the options are wrong (nothing was read or run), 1 when
    the work fails for a reason the user can fix (also a file or folder that cannot be written, a full
    disk), each with one ``error:`` line on stderr; anything else is a bug and keeps its traceback."""
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
        raise argparse.ArgumentTypeError(f"expected an integer or a comma list of integers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values[0] if len(values) == 1 and "," not in cleaned else values


def _optional(parse):
    def parse_optional(text: str):
        return None if text.strip().lower() in {"none", "null", ""} else parse(text)
    return parse_optional


def _parser_for(tp: Any):
    """The argparse ``type=`` for a dataclass field annotation."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if set(args) == {int, str}:
            inner = _int_or_str
        elif set(args) == {int, list[int]}:
            inner = _int_list
        elif len(args) == 1:
            inner = _parser_for(args[0])
        else:
            raise TypeError(f"no option parser for field type {tp!r}")
        return _optional(inner) if len(args) < len(typing.get_args(tp)) else inner
    if typing.get_origin(tp) is list:
        def parse_list(text: str) -> list:
            return [args[0](p) for p in text.strip().strip("[]()").replace(" ", "").split(",") if p]
        return parse_list
    if tp is bool:
        return parse_bool
    if tp in (int, float, str):
        return tp
    raise TypeError(f"no option parser for field type {tp!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """Add one option per field of ``cls`` (a dataclass) to ``parser``, in a group of their own."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title or cls.__name__)
    for field in dataclasses.fields(cls):
        if not field.init or field.metadata.get("cli") is False:
            continue
        tp = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        # %(default)s: argparse fills it in when --help prints, after any parser.set_defaults.
        help_text = " ".join(filter(None, [field.metadata.get("help"), "(default: %(default)s)"]))
        option = f"--{field.name}"
        if bool in (tp, *typing.get_args(tp)):
            # --flag, --flag=true, --flag false and --no-flag all work.
            group.add_argument(option, type=_parser_for(tp), nargs="?", const=True, default=default,
                               metavar="BOOL", help=help_text)
            group.add_argument(f"--no-{field.name}", dest=field.name, action="store_false",
                               help=argparse.SUPPRESS)
        else:
            choices = field.metadata.get("choices")
            kwargs: dict[str, Any] = {"type": _parser_for(tp), "default": default, "help": help_text}
            if choices is not None:
                kwargs["choices"] = list(choices)
                kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
            group.add_argument(option, **kwargs)


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
