"""`isynth config`: every field of a run's configuration with its value at a preset, its type and a line of
help.

The help is the comment written beside the field in its dataclass (the one place it is documented), read
from the source with `tokenize`, so the listing cannot drift from the code.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing
from functools import cache

from isynth.config import RunConfig


@cache
def field_comments(cls: type) -> dict[str, str]:
    """{field name: the comment on its line, or on the comment lines right above it} of a dataclass."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    pending: list[str] = []  # full-line comments waiting for the field below them
    line_name: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        row = tok.start[0]
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and row not in line_name:
            line_name[row] = tok.string
            if pending:
                out.setdefault(tok.string, " ".join(pending))
            pending = []
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if row in line_name:
                out[line_name[row]] = text  # a trailing comment wins over the ones above
            elif tok.line.strip().startswith("#"):
                pending.append(text)
        elif tok.type == tokenize.NEWLINE:
            if row not in line_name:
                pending = []
    return out


def _type_name(cls: type, name: str) -> str:
    hint = typing.get_type_hints(cls).get(name)
    text = str(hint).replace("typing.", "")
    return getattr(hint, "__name__", text) if not typing.get_args(hint) else text


def describe(run: RunConfig) -> list[dict]:
    """One row per leaf field: dotted name, value, type and help."""
    rows: list[dict] = []

    def walk(obj, prefix: str) -> None:
        cls = type(obj)
        notes = field_comments(cls)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            name = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, name + ".")
            else:
                rows.append({"field": name, "value": value, "type": _type_name(cls, f.name),
                             "help": notes.get(f.name, "")})

    for section in ("method", "sample", "model", "data", "tokenizer", "train"):
        walk(getattr(run, section), section + ".")
    return rows


def format_rows(rows: list[dict]) -> str:
    width = max(len(r["field"]) for r in rows)
    vwidth = min(24, max(len(repr(r["value"])) for r in rows))
    lines = []
    for r in rows:
        value = "none" if r["value"] is None else str(r["value"]).lower() if isinstance(r["value"], bool) \
            else str(r["value"])
        note = f"  # {r['help']}" if r["help"] else ""
        lines.append(f"{r['field']:<{width}}  {value:<{vwidth}}  {r['type']}{note}")
    return "\n".join(lines)
