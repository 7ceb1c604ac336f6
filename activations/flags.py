"""Command-line flags made from config dataclasses, so every default and its help text live
in one place: the dataclass field and the docstring under it (the style of sparsify's
`simple_parsing` use, without the dependency).

    add_flags(parser, HarvestConfig, skip={"out_dir"})      # --n-tokens, --batch-contexts, ...
    cfg = from_flags(HarvestConfig, args, out_dir="runs/x")  # unset flags keep the field default

Flags default to None, so a preset or a JSON config can fill what the command line left
unset; `from_flags` then falls back to the dataclass's own default.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Callable, Iterable
from functools import cache
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    from .model import ModelLoader


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: the docstring written under it} for a dataclass (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for stmt, following in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(following, ast.Expr) \
                    and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


def _flag_type(hint) -> dict[str, Any]:
    """argparse keywords for a field's type: scalars, Literal choices, lists (nargs="+"), bools."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        inner = [a for a in args if a is not type(None)]
        return _flag_type(inner[0]) if len(inner) == 1 else {"type": str}
    if origin is Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin in (list, tuple):
        return {"nargs": "+", **_flag_type(args[0] if args else str)}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint in (int, float, str):
        return {"type": hint}
    return {}  # nested configs and other types are not flags


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = (), only: Iterable[str] | None = None,
              rename: dict[str, str] | None = None, help_suffix: dict[str, str] | None = None,
              many: Iterable[str] = ()) -> list[str]:
    """Add one `--flag` per field of dataclass `cls` (help: the field's docstring and default).
    Fields in `many` take several values (a sweep over them). Returns the destinations added
    (skips nested configs and flags the parser already has)."""
    hints = typing.get_type_hints(cls)
    docs, rename, help_suffix = field_docs(cls), rename or {}, help_suffix or {}
    wanted = None if only is None else set(only)
    existing = {a.dest for a in parser._actions}
    added = []
    for f in dataclasses.fields(cls):
        dest = rename.get(f.name, f.name)
        if f.name in set(skip) or (wanted is not None and f.name not in wanted) or dest in existing:
            continue
        kwargs = _flag_type(list[hints[f.name]] if f.name in set(many) else hints[f.name])
        if not kwargs:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        text = docs.get(f.name, "").replace("%", "%%")
        text = f"{text} {help_suffix.get(f.name, '')}".strip() + f" (default: {default})"
        parser.add_argument("--" + dest.replace("_", "-"), dest=dest, default=None, help=text, **kwargs)
        added.append(dest)
    return added


def from_flags(cls: type, args: argparse.Namespace, rename: dict[str, str] | None = None, **overrides):
    """An instance of `cls` from the flags `add_flags` made: given flags win over the
    dataclass defaults, `overrides` win over both."""
    rename = rename or {}
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, rename.get(f.name, f.name), None)
        if value is not None:
            values[f.name] = value
    values.update(overrides)
    return cls(**values)


class Command(NamedTuple):
    """One `saewb` subcommand."""

    help: str
    """One line for `saewb --help` and the command's own description."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """Adds the command's own flags (the common ones are added for every command)."""
    run: Callable[[argparse.Namespace, ModelLoader], Any]
    """The command's body: (parsed flags, the model loader) -> its result."""
    sharded: bool = False
    """True: every torchrun rank runs it (harvest, train); False: rank 0 alone."""
