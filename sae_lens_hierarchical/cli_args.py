"""Config dataclasses as command lines: one docstring per field doubles as its `--help`.

As in sparsify, a config is a dataclass whose fields carry a docstring each (the string literal
right below the field); `add_arguments(parser, Config)` turns every field into an option and
`from_args(Config, args)` builds the config back, so a field is written once. `parse_override`
reads the `KEY=VALUE` overrides (YAML values) that `hsae train --set` and `hsae demo --set` take.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from typing import Any

import yaml


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} for a dataclass, read from the class source (attribute
    docstrings, as Sphinx and simple_parsing read them); base classes' fields included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_list(item_type: type) -> Any:
    def parse(text: str) -> list[Any]:
        value = yaml.safe_load(text if text.strip().startswith("[") else f"[{text}]")
        if not isinstance(value, list):
            raise argparse.ArgumentTypeError(f"expected a list, e.g. 4,4 or [4, 4]; got {text!r}")
        try:
            return [item_type(v) for v in value]
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"expected a list of {item_type.__name__}s, e.g. 4,4; got {text!r}"
            ) from None

    return parse


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` option per field of dataclass `cls` (booleans become on/off flags)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )  # type: ignore[misc]
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if optional else hint
        help_text = docs.get(f.name, "")
        flag = "--" + f.name.replace("_", "-")
        extra = dict(f.metadata.get("cli", {}))  # e.g. {"action": "append", "metavar": "KEY=VALUE"}
        if extra:
            parser.add_argument(flag, dest=f.name, default=default, help=help_text, **extra)
            continue
        if base is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            continue
        kw: dict[str, Any] = {
            "dest": f.name,
            "default": default,
            "help": f"{help_text} (default: {default})" if default is not None else help_text,
        }
        origin = typing.get_origin(base)
        if origin is typing.Literal:
            kw["choices"] = list(typing.get_args(base))
            kw["type"] = type(kw["choices"][0])
        elif origin is list:
            kw["type"] = _parse_list((typing.get_args(base) or (str,))[0])
            kw["metavar"] = "LIST"
        elif base in (int, float, str):
            kw["type"] = base
        elif origin is dict:
            continue  # filled by --set
        parser.add_argument(flag, **kw)


def from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The dataclass `cls` from parsed `args` (fields add_arguments made) plus `extra`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    values.update(extra)
    return cls(**values)


class OverrideError(ValueError):
    """A KEY=VALUE override cannot be read; the message names the flag and the value."""


def parse_override(item: str, flag: str = "--set") -> tuple[list[str], Any]:
    """`a.b=VALUE` -> (["a", "b"], VALUE read as YAML, so 1e-3, [4, 8] and null work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise OverrideError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} k=24")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise OverrideError(f"{flag} {item!r}: the value {raw!r} is not valid YAML ({problem})") from None
    return key.strip().split("."), value


# ----------------------------------------------------------------------------------------------
# Checking a mapping of fields against a dataclass: unknown keys (with the closest valid one) and
# values of the wrong type (YAML's 1e-3 is text, and is read as the number it spells).


class FieldError(ValueError):
    """A key or value is invalid; the message names it, its value and what is allowed."""


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def check_keys(section: dict[str, Any], allowed: set[str], where: str, path: str) -> None:
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise FieldError(f"{path}: unknown key {where + key!r}{hint}")


class _Unchecked(Exception):
    """The annotation is not one the checker understands: the value is passed on as given."""


def coerce(value: Any, hint: Any) -> Any:
    """`value` as the annotation `hint` wants it, or raise ValueError (or _Unchecked)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise ValueError
    if origin in (typing.Union, types.UnionType):
        alternatives = typing.get_args(hint)
        unchecked = False
        # An exact type match first, so `bool | int` keeps True a bool and `int | None` None.
        for alt in alternatives:
            if isinstance(alt, type) and type(value) is alt:
                return value
        for alt in alternatives:
            try:
                return coerce(value, alt)
            except ValueError:
                continue
            except _Unchecked:
                unchecked = True
        if unchecked:
            return value
        raise ValueError
    if origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ValueError
    if origin is list:
        (item_hint,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise ValueError
        return [coerce(v, item_hint) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if hint is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        number = float(value) if isinstance(value, (float, str)) else None
        if number is not None and number.is_integer():
            return int(number)
        raise ValueError
    if hint is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return value
        if isinstance(value, str):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as text
        raise ValueError
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError
    raise _Unchecked


def describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        item = (typing.get_args(hint) or (Any,))[0]
        plural = {int: "integers", float: "numbers", str: "texts", bool: "true/false values"}
        return f"a list of {plural.get(item, describe(item))}"
    names = {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "text"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass `hint` names (also inside `X | None`), else None."""
    candidates = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)), None)


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def _check_nested(section: dict[str, Any], cls: type, where: str, path: str) -> None:
    """A nested dataclass section; a registry-dispatched one (SAELens's synthetic generators:
    `generator_name` picks the subclass) is checked against the subclass it names."""
    name = section.get("generator_name")
    if callable(getattr(cls, "generator_name", None)) and name is not None:
        choices = {sub.generator_name(): sub for sub in _subclasses(cls) if not inspect.isabstract(sub)}  # type: ignore[attr-defined]
        if name not in choices:
            raise FieldError(
                f"{path}: {where}generator_name={name!r} is invalid: expected one of {', '.join(map(repr, sorted(choices)))}"
            )
        check_fields(section, choices[name], where, path, skip=("generator_name",))
    elif not inspect.isabstract(cls):
        check_fields(section, cls, where, path)


def check_types(section: dict[str, Any], cls: type, where: str, path: str, skip: tuple[str, ...] = ()) -> None:
    """Check (and normalise) each given value against its dataclass field's annotation."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: leave the values to the config classes
        return
    for key, value in list(section.items()):
        if key in skip or key not in hints:
            continue
        nested = _dataclass_in(hints[key])
        if nested is not None and isinstance(value, dict):  # a nested section: same checks inside
            _check_nested(value, nested, f"{where}{key}.", path)
            continue
        try:
            section[key] = coerce(value, hints[key])
        except _Unchecked:
            continue
        except (ValueError, TypeError):
            raise FieldError(f"{path}: {where + key}={value!r} is invalid: expected {describe(hints[key])}") from None


def check_fields(
    section: dict[str, Any], cls: type, where: str = "", path: str = "config", skip: tuple[str, ...] = ()
) -> None:
    """Unknown keys and mistyped values of `section` for dataclass `cls`, normalised in place."""
    check_keys(section, _fields(cls) | set(skip), where, path)
    check_types(section, cls, where, path, skip)
