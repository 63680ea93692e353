"""Every config key with its type, default, allowed values and help, generated from the schema.

The dataclasses of :mod:`train.config` (and the sections that live next to their code) already carry each key's
type hint, default and ``metadata={"help", "min", "max"}``; this turns them into the key list that
``python -m train --help`` prints and into ``docs/config.md`` (a test keeps that file current).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, List, Literal, Tuple, Type, Union

from .config import Config

DOC_HEADER = """# Config keys

Generated from the config schema by `python -m train --help-config markdown` (a test checks that this file is
current). Set any key in a recipe or with `--set section.key=value`; values are YAML. `[]` marks the fields of
each item of a list.
"""


@dataclass(frozen=True)
class KeyDoc:
    key: str
    type: str
    default: str
    allowed: str
    help: str


def _nested(tp: Any) -> Tuple[Any, str]:
    """The dataclass inside ``tp`` (itself, ``Optional[...]`` or ``List[...]``) and the key suffix it adds."""
    if dataclasses.is_dataclass(tp):
        return tp, ""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _nested(inner[0])
    if origin in (list, List) and args and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    return None, ""


def _type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "choice"
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_text(a) for a in args)
    if origin in (list, List):
        return f"list of {_type_text(args[0])}"
    if origin in (tuple, Tuple):
        return f"[{', '.join(_type_text(a) for a in args)}]"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(tp, str(tp))


def _allowed(tp: Any, meta: typing.Mapping[str, Any]) -> str:
    choices = [a for a in _flat_args(tp) if typing.get_origin(a) is Literal]
    parts = [", ".join(str(c) for lit in choices for c in typing.get_args(lit))] if choices else []
    if "min" in meta and "max" in meta:
        parts.append(f"{meta['min']} to {meta['max']}")
    elif "min" in meta:
        parts.append(f">= {meta['min']}")
    elif "max" in meta:
        parts.append(f"<= {meta['max']}")
    return "; ".join(parts)


def _flat_args(tp: Any) -> List[Any]:
    return list(typing.get_args(tp)) if typing.get_origin(tp) is Union else [tp]


def _default_text(f: "dataclasses.Field[Any]") -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        value = list(value)
    return str(value)


def key_docs(cls: Type[Any] = Config, prefix: str = "") -> List[KeyDoc]:
    """One entry per leaf key, depth first in declaration order; nested sections are expanded."""
    out: List[KeyDoc] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        inner, suffix = _nested(tp)
        help_text = " ".join(str(f.metadata.get("help", "")).split())
        if inner is not None and prefix == "":
            out += key_docs(inner, key)  # a top-level section
            continue
        if inner is not None:
            out.append(KeyDoc(key, _type_text(tp), _default_text(f), "", help_text))
            out += key_docs(inner, key + suffix)
            continue
        out.append(KeyDoc(key, _type_text(tp), _default_text(f), _allowed(tp, f.metadata), help_text))
    return out


def render_text(docs: List[KeyDoc]) -> str:
    """Two lines a key, for a terminal: ``key  type = default  [allowed]`` then the help, indented."""
    lines = []
    for d in docs:
        allowed = f"  [{d.allowed}]" if d.allowed else ""
        lines.append(f"  {d.key}  ({d.type}) = {d.default}{allowed}")
        if d.help:
            lines.append(f"      {d.help}")
    return "\n".join(lines)


def render_markdown(docs: List[KeyDoc]) -> str:
    """``docs/config.md``: one table per top-level section."""
    out = [DOC_HEADER]
    section = None
    for d in docs:
        top = d.key.split(".")[0] if "." in d.key else "(top level)"
        if top != section:
            section = top
            out += ["", f"## `{top}`" if top != "(top level)" else "## Top level", "",
                    "| key | type | default | allowed | help |", "|---|---|---|---|---|"]
        cells = [f"`{d.key}`", d.type, f"`{d.default}`", d.allowed, d.help]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"
