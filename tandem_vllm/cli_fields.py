"""Command-line flags generated from a pydantic model's or a dataclass's fields: one source for names,
types, choices, defaults and help (the field's description; a dataclass field's ``metadata["help"]``).
A flag left out is None in the namespace, so the model's own default applies."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_field_flags(parser: argparse.ArgumentParser, model: type[BaseModel], *, skip: Iterable[str] = (),
                    types_: dict[str, Callable[[str], Any]] | None = None,
                    aliases: dict[str, list[str]] | None = None, metavars: dict[str, str] | None = None) -> list[str]:
    """One flag per field of ``model`` not in ``skip``; returns the field names that got one.

    types_: a parser for fields whose flag takes something other than the field's own type (a file, JSON).
    """
    added = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        help_text = (field.description or "").replace("%", "%%")
        if not field.is_required() and field.default is not None and field.default_factory is None:
            help_text += f" (default: {field.default})"
        kw: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        kind = _plain(field.annotation)
        if types_ and name in types_:
            kw["type"] = types_[name]
        elif kind is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(kind) is typing.Literal:
            kw["choices"] = list(typing.get_args(kind))
        elif kind in (int, float, str):
            kw["type"] = kind
        elif typing.get_origin(kind) is list and typing.get_args(kind) == (str,):
            kw["nargs"] = "+"
        else:  # dicts, nested models, lists of tuples: JSON, validated by the model
            kw["type"] = _json(flag(name))
            kw["metavar"] = "JSON"
        if metavars and name in metavars:
            kw["metavar"] = metavars[name]
        parser.add_argument(flag(name), *(aliases or {}).get(name, []), **kw)
        added.append(name)
    return added


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *,
                        special: dict[str, dict[str, Any]] | None = None,
                        required: Iterable[str] = ()) -> list[str]:
    """One flag per field of the dataclass ``cls`` whose metadata does not say ``flag=False``; a field
    that is itself a dataclass gets its fields' flags instead. Returns the field names that got one.

    special: argparse settings for fields whose flag is not their type (``--block-size 1-4``)."""
    hints = typing.get_type_hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag", True):
            continue
        kind = _plain(hints[f.name])
        if dataclasses.is_dataclass(kind):
            added += add_dataclass_flags(parser, kind)  # type: ignore[arg-type]
            continue
        help_text = str(f.metadata.get("help", "")).replace("%", "%%")
        if f.default is not dataclasses.MISSING and f.default not in (None, (), False):
            help_text += f" (default: {f.default})"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if f.name in required:
            kw["required"] = True
        args = typing.get_args(kind)
        if special and f.name in special:
            kw.update(special[f.name])
        elif kind is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(kind) is typing.Literal:
            kw["choices"] = list(args)
        elif kind in (int, float, str, Path):
            kw["type"] = kind
        elif typing.get_origin(kind) is tuple and len(args) == 2 and args[1] is Ellipsis:
            kw["type"], kw["nargs"] = args[0], "+"
        elif typing.get_origin(kind) is list and len(args) == 1:
            kw["type"], kw["nargs"] = args[0], "+"
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for {kind!r}; give its settings in special")
        parser.add_argument(flag(f.name), **kw)
        added.append(f.name)
    return added


def passed(a: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The fields the command line set."""
    return {n: getattr(a, n) for n in names if getattr(a, n, None) is not None}


def passed_frozen(a: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """``passed`` for a frozen dataclass: its ``tuple[X, ...]`` fields get tuples, not argparse's lists."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in passed(a, names).items()}


def _plain(annotation: Any) -> Any:
    """``X | None`` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [t for t in typing.get_args(annotation) if t is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _json(name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} is not JSON: {text!r}") from None

    return parse
