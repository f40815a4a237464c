"""README.md's table of every config key, generated from the dataclasses in config.py.

The meaning of a key is the docstring under its field, its default the field's default (which the
shipped configs/*.yaml repeat; a test checks both), so the table cannot drift from the code.

    uv run python scripts/config_table.py           # print the table
    uv run python scripts/config_table.py --write   # put it into README.md, between the markers
    uv run python scripts/config_table.py --check   # exit 1 if README.md's copy is stale
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from smolcluster import config
from smolcluster.config import Config

README = config.REPO_ROOT / "README.md"
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def field_docs() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the docstring right under that field in config.py."""
    tree = ast.parse(Path(config.__file__).read_text())
    docs = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for a, b in zip(cls.body, cls.body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[cls.name, a.target.id] = " ".join(b.value.value.split())
    return docs


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"map of {type_name(args[1])}"
    return {type(None): "null", bool: "bool", int: "int", float: "number", str: "text"}.get(tp, getattr(tp, "__name__", str(tp)))


def rows(cls: type = Config, prefix: str = "", docs: dict | None = None) -> list[tuple[str, str, str, str]]:
    """(key, default, type, meaning) for every leaf key under `cls`; a map of sections gets `<name>`."""
    docs = field_docs() if docs is None else docs
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += rows(tp, f"{key}.", docs)
            continue
        doc = docs.get((cls.__name__, f.name), "").replace("|", "\\|")
        if not doc:
            raise SystemExit(f"config.py: {cls.__name__}.{f.name} has no docstring; write one under the field")
        value_tp = typing.get_args(tp)[1] if typing.get_origin(tp) is dict else None
        if value_tp is not None and dataclasses.is_dataclass(value_tp):
            out.append((key, "`{}`", "map of sections", doc))
            out += rows(value_tp, f"{key}.<name>.", docs)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = default if isinstance(default, str) else json.dumps(default)  # as YAML writes it
        out.append((key, f"`{shown}`", type_name(tp), doc))
    return out


def markdown() -> str:
    lines = ["| key | default | type | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{k}` | {d} | {t} | {m} |" for k, d, t, m in rows()]
    return "\n".join(lines) + "\n"


def readme_with_table(text: str) -> str:
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"{README}: no {START} ... {END} markers to put the table between")
    return f"{head}{START}\n{markdown()}{END}{tail}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="update README.md in place")
    g.add_argument("--check", action="store_true", help="exit 1 if README.md's table is stale")
    args = p.parse_args()
    if not (args.write or args.check):
        sys.stdout.write(markdown())
        return 0
    text = README.read_text()
    fresh = readme_with_table(text)
    if args.check:
        if fresh != text:
            print(f"{README}: the config table is stale; run: uv run python scripts/config_table.py --write")
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
