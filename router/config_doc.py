"""The configuration reference, generated from the settings models themselves (``router.config``), so it cannot
drift from what the gateway accepts: ``python -m router config-reference`` prints it (docs/reference/configuration.md
is its output, and a test checks the two agree)."""

from __future__ import annotations

import enum
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from router.config import Settings

HEADER = """# Configuration reference

Generated from the settings models in `router/config.py` by `python -m router config-reference`; do not edit by
hand. The file is YAML (`config.yaml` is the embedded default; `--config` names another). Every field can also be
set from the environment: `ROUTER_` + the section and field in capitals, joined by `__`
(`ROUTER_POLICY__THRESHOLD=0.9`); lists and mappings take JSON (`ROUTER_AUTH__API_KEYS='["sk-1"]'`). Inside the
file, `${VAR}` and `${VAR:-default}` are replaced from the environment, and relative paths are resolved against
the file's folder. `python -m router check --config FILE` validates a file and its probes without serving.
"""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (directly, optionally, or as list items), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a!r}`".replace("'", '"') for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type(args[0])} to {_type(args[1])}"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
        if issubclass(annotation, enum.Enum):
            return " \\| ".join(f'`"{m.value}"`' for m in annotation)
        if annotation is SecretStr:
            return "secret string"
        if annotation is Path:
            return "path"
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
        if isinstance(value, BaseModel):
            return "(its defaults)"
        if isinstance(value, Path):
            return "(per user: `$XDG_CACHE_HOME/probe-router`)" if "probe-router" in str(value) else f"`{value}`"
        return f"`{value!r}`" if value not in ([], {}) else "empty"
    if field.default is PydanticUndefined:
        return "**required**"
    if field.default is None:
        return "null"
    if isinstance(field.default, bool):
        return f"`{str(field.default).lower()}`"
    if isinstance(field.default, str):
        return f'`"{field.default}"`'
    return f"`{field.default}`"


def _bounds(field: FieldInfo) -> str:
    words = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥"),
                           ("max_length", "length ≤"), ("pattern", "matches")):
            value = getattr(m, attr, None)
            if value is not None:
                words.append(f"{sign} `{value}`")
    return ", ".join(words)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section(model: type[BaseModel], path: str, seen: set[type[BaseModel]], out: list[str]) -> None:
    nested: list[tuple[type[BaseModel], str]] = []
    doc = (model.__doc__ or "").strip()
    out.append(f"## {model.__name__}\n")
    out.append(f"`{path}`" + (f": {' '.join(doc.split())}" if doc and not doc.startswith("Usage docs") else "") + "\n")
    out.append("| field | type | default | allowed | description |")
    out.append("|---|---|---|---|---|")
    for name, field in model.model_fields.items():
        out.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {_bounds(field)} | "
                   f"{_cell(field.description or '')} |")
        inner = _model_of(field.annotation)
        if inner is not None and inner not in seen:
            seen.add(inner)
            many = typing.get_origin(field.annotation) is list or any(
                typing.get_origin(a) is list for a in typing.get_args(field.annotation))
            nested.append((inner, f"{path}.{name}[]" if many else f"{path}.{name}"))
    out.append("")
    for inner, inner_path in nested:
        _section(inner, inner_path, seen, out)


def reference() -> str:
    out = [HEADER]
    seen: set[type[BaseModel]] = set()
    out.append("## Sections\n")
    out.append("| section | what it configures |")
    out.append("|---|---|")
    sections = []
    for name, field in Settings.model_fields.items():
        model = _model_of(field.annotation)
        if model is not None:
            out.append(f"| [`{name}`](#{model.__name__.lower()}) | {_cell(field.description or model.__doc__ or '')} |")
            sections.append((model, name))
    out.append("")
    for model, name in sections:
        if model not in seen:
            seen.add(model)
            many = typing.get_origin(Settings.model_fields[name].annotation) is list
            _section(model, f"{name}[]" if many else name, seen, out)
    return "\n".join(out).rstrip() + "\n"
