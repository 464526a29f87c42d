"""argparse from dataclasses, and the help formatting of the `vtok` command line (vtok/cli.py)."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Iterable, Mapping, Sequence


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with each option's default appended, "(default: X)", or "(default: none)" for an
    empty one, unless its help already speaks of its default; nothing for flags (on/off), required
    options and positionals."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is argparse.SUPPRESS or isinstance(default, bool)
                or action.required or not action.option_strings):
            return text
        return f"{text} (default: {'none' if default in (None, '') else '%(default)s'})"


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The top-level help: description and command table kept as written."""


def missing_help(cls: type, texts: Mapping[str, str]) -> dict[str, str]:
    """``texts`` for the fields of dataclass ``cls`` whose metadata has no help (the dataclass's own
    help always wins)."""
    return {f.name: texts[f.name] for f in dataclasses.fields(cls)
            if f.name in texts and not f.metadata.get("help")}


def plain(text: str) -> str:
    """Docstring text for ``--help``: no reStructuredText double backticks."""
    return text.replace("``", "")


def walk_parsers(parser: argparse.ArgumentParser, path: str = "vtok"
                 ) -> Iterable[tuple[str, argparse.ArgumentParser]]:
    """``(command path, parser)`` of ``parser`` and every subcommand parser under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from walk_parsers(child, f"{path} {name}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, help: Mapping[str, str] | None = None,
                       choices: Mapping[str, Sequence[Any]] | None = None, exclude: Iterable[str] = ()) -> None:
    """One ``--field-name`` flag per field of dataclass ``cls`` (int, float, str or bool), in field
    order: type and default from the field (no default: required); a bool becomes ``--x`` (default
    False) or ``--no-x`` (default True). Help and choices come from ``help`` / ``choices`` (by field
    name) or else from the field's ``metadata={"help": ..., "choices": ...}``."""
    hints = typing.get_type_hints(cls)
    skip = set(exclude)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, flag = hints[f.name], "--" + f.name.replace("_", "-")
        text = (help or {}).get(f.name, f.metadata.get("help"))
        if f.default is not dataclasses.MISSING:
            default: dict[str, Any] = {"default": f.default}
        elif f.default_factory is not dataclasses.MISSING:
            default = {"default": f.default_factory()}
        else:
            default = {"required": True}
        if kind is bool:
            on = default.get("default", False)
            parser.add_argument("--no-" + flag[2:] if on else flag, dest=f.name, help=text,
                                action="store_false" if on else "store_true")
            continue
        if kind not in (int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: type {kind} has no flag form (int, float, str, bool)")
        options = (choices or {}).get(f.name, f.metadata.get("choices"))
        parser.add_argument(flag, type=None if kind is str else kind, help=text,
                            **({"choices": tuple(options)} if options else {}), **default)


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    """An instance of dataclass ``cls`` from the parsed flags ``add_dataclass_args`` made (fields
    with no attribute in ``args`` keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
