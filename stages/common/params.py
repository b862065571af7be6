"""Load one ``params.yaml`` section into a stage's frozen ``Params`` dataclass, strictly.

Each stage owns a ``params.yaml`` section of its own name and a frozen dataclass that mirrors it
(DVC's example-get-started layout). The section must hold exactly the dataclass's fields: an
unknown key is usually a typo that would otherwise be silently ignored, a missing key would hide a
default that ``dvc.lock`` never records. Values are checked against the field annotations here;
ranges and cross-field rules are checked by each dataclass's ``__post_init__``.

The file is parsed with ruamel.yaml (YAML 1.2), the parser DVC itself uses for ``params:``, so the
value a stage runs with is the value DVC records in ``dvc.lock`` and writes with ``dvc exp run -S``.
(PyYAML's YAML 1.1 would read ``1e-3`` as the string ``"1e-3"`` and ``on`` as ``True``.)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ParamsError", "load_params", "params_from_mapping"]

T = TypeVar("T")


class ParamsError(ValueError):
    """A ``params.yaml`` section that does not match its stage's ``Params`` dataclass."""


def load_params(section: str, cls: type[T], path: str | Path = "params.yaml") -> T:
    """Read ``section`` of the YAML file at ``path`` into ``cls``, rejecting anything unexpected.

    Args:
        section: the top-level key, also the stage's name.
        cls: a dataclass whose fields mirror the section.
        path: the params file.

    Returns:
        ``cls(**values)`` with YAML lists turned into tuples where the field is a tuple.

    Raises:
        ParamsError: no such file or section, an unknown or missing key, a value of the wrong
            type, or (from ``cls.__post_init__``) a value out of range.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file (run from the repository root or pass --params)")
    try:
        data = YAML(typ="safe", pure=True).load(path.read_text())
    except YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict) or section not in data:
        raise ParamsError(
            f"{path}: no '{section}:' section; add one with the keys {_field_names(cls)}"
        )
    values = data[section]
    if not isinstance(values, dict):
        raise ParamsError(
            f"{path}: '{section}:' must be a mapping of the keys {_field_names(cls)}, "
            f"not {type(values).__name__}"
        )
    return params_from_mapping(section, cls, values, source=str(path))


def params_from_mapping(section: str, cls: type[T], values: dict[str, Any], source: str = "params") -> T:
    """Check ``values`` against the fields of ``cls`` and build it; see :func:`load_params`."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}

    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamsError(
            f"{source}: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"the '{section}' section takes exactly {_field_names(cls)} (remove or rename them)"
        )
    missing = [name for name in fields if name not in values]
    if missing:
        raise ParamsError(
            f"{source}: missing key(s) {', '.join(f'{section}.{k}' for k in missing)}; "
            f"add them to the '{section}:' section"
        )
    converted = {name: _convert(values[name], annotation, f"{section}.{name}", source)
                 for name, annotation in fields.items()}
    try:
        return cls(**converted)
    except ParamsError:
        raise
    except (ValueError, TypeError) as err:
        where = f"{section}: " if "." in section else ""  # a nested entry's checks do not know its key
        raise ParamsError(f"{source}: {where}{err}") from err


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _convert(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Return ``value`` if it is an instance of ``annotation`` (lists become tuples), else raise."""
    ok, converted = _match(value, annotation, key, source)
    if ok:
        return converted
    hint = ""
    if isinstance(value, str) and _accepts(annotation, float):
        hint = " (a number in quotes is a string: remove the quotes)"
    raise ParamsError(
        f"{source}: {key} must be {_describe(annotation)}, got {value!r} ({type(value).__name__}){hint}"
    )


def _accepts(annotation: Any, kind: type) -> bool:
    if annotation is kind:
        return True
    return any(_accepts(arg, kind) for arg in typing.get_args(annotation)
               if typing.get_origin(annotation) in (typing.Union, types.UnionType))


def _match(value: Any, annotation: Any, key: str = "", source: str = "params") -> tuple[bool, Any]:
    """``(ok, converted)``; a nested dataclass that does not fit raises its own ParamsError (naming ``key``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:  # YAML's true/false are ints to Python: refuse them here
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = _match(value, arg, key, source)
            if ok:
                return True, converted
        return False, value
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args), value
    if dataclasses.is_dataclass(annotation):  # a nested entry (train.methods.<name>), checked like a section
        if not isinstance(value, dict):
            return False, value
        return True, params_from_mapping(key, annotation, value, source)
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        key_type, value_type = args or (Any, Any)
        items = {}
        for name, item in value.items():
            ok_key, name = (True, name) if key_type is Any else _match(name, key_type)
            ok_item, item = (True, item) if value_type is Any else _match(item, value_type, f"{key}.{name}", source)
            if not (ok_key and ok_item):
                return False, value
            items[name] = item
        return True, items
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return False, value
            item_types = args
        else:
            item_types = (args[0] if args else Any,) * len(value)
        items = []
        for item, item_type in zip(value, item_types):
            ok, converted = (True, item) if item_type is Any else _match(item, item_type, key, source)
            if not ok:
                return False, value
            items.append(converted)
        return True, tuple(items) if origin is tuple else items
    raise TypeError(f"params fields of type {annotation!r} are not supported")


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation in (bool, int, str):
        return {bool: "true or false", int: "an integer", str: "a string"}[annotation]
    if annotation is float:
        return "a number"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if dataclasses.is_dataclass(annotation):
        return f"a mapping of the keys {_field_names(annotation)}"
    plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
    if origin is dict:
        if not args:
            return "a mapping"
        return f"a mapping from {plural.get(args[0], _describe(args[0]))} to {plural.get(args[1], _describe(args[1]))}"
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
        return f"a list of {plural.get(args[0], _describe(args[0])) if args else 'values'}"
    return repr(annotation)
