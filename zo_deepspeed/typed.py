"""The typed config machinery: a config section is a frozen dataclass, and its field types are the one
source of its choices, of how values are read, and (with the field docstrings) of its ``--help``.

* :func:`choices` -- the members of a ``Literal`` field type (validation messages, the CLI and the
  planner take their choices from it);
* :func:`coerce` -- one value read by its field type;
* :func:`section_values` -- a mapping (a section of a config file or of a log header) read field by field;
* :func:`check_fields` -- the type check every section runs first in ``__post_init__``;
* :func:`field_docs` -- the docstring under each field, read from the source with ``ast`` (cached).

Coercion rules, by field type and by where the value comes from (``origin``): ``python`` a constructor
call, ``file`` a YAML/JSON value, ``cli`` the text of a ``section.key=value`` override.

* ``bool``: a boolean. From a file also the strings true/false (any case); on the command line
  true/false, yes/no, on/off, 1/0 (any case; an override is always text). Nothing else: a file's
  ``"no"`` or ``1`` is refused instead of counting as true.
* ``int``: an integer (never a boolean). From a file also an integral float (``3.0``); on the command line
  digits, or a float spelling of an integer (``1e3``). ``2.6`` is refused, never rounded.
* ``float``: a number (never a boolean). A numeric string is accepted from a file too, with a note on stderr:
  PyYAML (YAML 1.1) reads ``1e-5`` as a string, the number is written ``1.0e-5``.
* ``str``: a string; a file's number or list is refused (quote it).
* ``Literal[...]``: one of its members, exactly.
* ``X | None``: also null (``null``/``none`` on the command line); null anywhere else is refused.

Every refusal is a ValueError of one line naming ``section.key``, the value and the fix.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import os
import re
import sys
import textwrap
import types
import typing
from typing import Any, Literal, Mapping

__all__ = ["Origin", "choices", "field_types", "field_docs", "coerce", "section_values", "check_fields",
           "canonical_key", "show"]

Origin = Literal["python", "file", "cli"]

_FILE_BOOLS = {"true": True, "false": False}
_CLI_BOOLS = {**_FILE_BOOLS, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}
_CLI_NULLS = ("null", "none")


def choices(tp: Any) -> tuple:
    """The members of a ``Literal`` type (or of the Literal in ``Literal[...] | None``); () for other types."""
    tp = _unwrap_optional(tp)[0]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None``, (tp, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            raise TypeError(f"config fields support X | None unions only, not {tp}")
        return rest[0], True
    return tp, False


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> evaluated type annotation of a dataclass (cached)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body ('' where there is none)."""
    docs = {f.name: "" for f in dataclasses.fields(cls)}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source (frozen app, REPL): help without docs
        return docs
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in docs
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def show(value: Any) -> str:
    """A value as a config file writes it: null, true/false, 'text', numbers and lists as they are."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    if isinstance(value, float) and "e" in text and "." not in text:
        text = text.replace("e", ".0e")  # 1e-05 -> 1.0e-05, a number in YAML 1.1 too
    return text if len(text) <= 60 else text[:57] + "..."


def _number(text: str) -> int | float | None:
    s = text.strip()
    for parse in (int, float):
        try:
            return parse(s)
        except ValueError:
            pass
    return None


def _yaml_number(text: str, num: float) -> str:
    """How to write ``text`` so that YAML 1.1 reads a number: a dot in the mantissa, a sign on the exponent."""
    m = re.fullmatch(r"\s*([+-]?)(\d*)(?:\.(\d*))?[eE]([+-]?)(\d+)\s*", text)
    if m:
        sign, whole, frac, esign, exp = m.groups()
        return f"{sign}{whole or '0'}.{frac or '0'}e{esign or '+'}{exp}"
    return repr(num)


def _tell(kind: str, message: str) -> None:
    """One line on stderr (rank 0 only under a launcher: every rank reads the same config)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"zo-deepspeed: {kind}: {message}", file=sys.stderr)


def coerce(value: Any, tp: Any, key: str, origin: Origin = "python") -> Any:
    """``value`` read as a ``tp`` (the field's type) under the rules of the module docstring; ``key``
    (``section.key``) names it in errors. Raises ValueError (one line) for a value of the wrong type."""
    inner, optional = _unwrap_optional(tp)
    if origin == "cli" and optional and isinstance(value, str) and value.strip().lower() in _CLI_NULLS:
        return None
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key}=null is not allowed: {key} needs {_kind(inner)} (remove the key for its default)")
    members = choices(inner)
    if members:
        if isinstance(value, str) and value in members:
            return value
        hint = " (YAML reads unquoted yes/no/on/off as booleans: quote it)" if isinstance(value, bool) else ""
        raise ValueError(f"{key}={show(value)}; use one of {', '.join(members)}{hint}")
    if inner is bool:
        return _to_bool(value, key, origin)
    if inner is int:
        return _to_int(value, key, origin)
    if inner is float:
        return _to_float(value, key, origin)
    if inner is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}={show(value)} is not a string; write one string in quotes, e.g. {key}: \"...\"")
    if isinstance(inner, type) and dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        raise ValueError(f"{key} must be a {inner.__name__}, got {show(value)}")
    raise TypeError(f"{key}: config fields of type {tp} are not supported")


def _kind(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, f"one of {', '.join(choices(tp))}" if choices(tp) else str(tp))


def _to_bool(value: Any, key: str, origin: Origin) -> bool:
    if isinstance(value, bool):
        return value
    table = {"file": _FILE_BOOLS, "cli": _CLI_BOOLS}.get(origin, {})
    if isinstance(value, str) and value.strip().lower() in table:
        return table[value.strip().lower()]
    spelled = "true or false" + (" (or yes/no, on/off, 1/0)" if origin == "cli" else "")
    raise ValueError(f"{key}={show(value)} is not a boolean; write {spelled}")


def _to_int(value: Any, key: str, origin: Origin) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    num = None
    if isinstance(value, float) and origin != "python":
        num = value
    elif isinstance(value, str) and origin == "cli":
        num = _number(value)
    if isinstance(num, int) or (isinstance(num, float) and num.is_integer()):
        return int(num)
    parsed = _number(value) if isinstance(value, str) else value if isinstance(value, float) else None
    if origin == "file" and isinstance(value, str) and parsed is not None and float(parsed).is_integer():
        raise ValueError(f"{key}={show(value)} is a string; write {int(parsed)} (a number, no quotes)")
    if isinstance(parsed, float) and math.isfinite(parsed):
        lo, hi = math.floor(parsed), math.ceil(parsed)
        fix = f"{lo}" if lo == hi else f"{lo} or {hi}"
        raise ValueError(f"{key}={show(value)} is not an integer; write a whole number ({fix})")
    raise ValueError(f"{key}={show(value)} is not an integer; write a whole number (digits only, e.g. 3)")


def _to_float(value: Any, key: str, origin: Origin) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    num = _number(value) if isinstance(value, str) and origin != "python" else None
    if num is not None:
        if origin == "file":
            _tell("note", f"{key}: read the string {value!r} as the number {show(float(num))}; write "
                  f"{_yaml_number(value, float(num))} for a number (YAML 1.1 wants a dot and a signed exponent)")
        return float(num)
    raise ValueError(f"{key}={show(value)} is not a number; write a number such as 1.0e-5")


def canonical_key(cls: type, name: str, section: str, *, warn: bool = True) -> str:
    """``name`` with a renamed key (``cls.RENAMED``: old -> new) mapped to its new name, with a one-line
    deprecation warning unless ``warn`` is False."""
    new = getattr(cls, "RENAMED", {}).get(name)
    if new is None:
        return name
    if warn:
        _tell("warning", f"{section}.{name} is deprecated and will be removed; write {section}.{new}")
    return new


def section_values(cls: type, raw: Mapping, section: str, origin: Origin = "file", *, where: str = "",
                   warn: bool = True) -> dict[str, Any]:
    """The keys of ``raw`` (one section of a config file, or a log header's) checked against ``cls``'s fields,
    renamed keys mapped, and each value coerced. ``where`` (e.g. " in run.yaml") goes into the messages."""
    types_ = field_types(cls)
    names = {str(k): canonical_key(cls, str(k), section, warn=warn) for k in raw}
    unknown = sorted(k for k, n in names.items() if n not in types_)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in section {section!r}{where}; known: {', '.join(sorted(types_))}")
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # new name -> the key it was given as
    for k, v in raw.items():
        name = names[str(k)]
        if name in out:
            raise ValueError(f"{section}.{given[name]} and {section}.{k} are the same key{where}; "
                             f"keep {section}.{name} only")
        given[name] = str(k)
        out[name] = coerce(v, types_[name], f"{section}.{name}", origin)
    return out


def check_fields(obj: Any, section: str) -> None:
    """Each field of a constructed section (``section``: its name in messages, "" for the top level) against
    its type under the ``python`` rules: first in ``__post_init__``, so that the range checks after it see
    values of the right type."""
    for name, tp in field_types(type(obj)).items():
        coerce(getattr(obj, name), tp, f"{section}.{name}" if section else name, "python")
