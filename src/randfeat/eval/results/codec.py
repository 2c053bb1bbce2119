"""JSON for typed records: frozen dataclasses that write and read themselves, checking types.

The records of a result file ([randfeat.eval.results.records][]) subclass
[Record][randfeat.eval.results.codec.Record]. `to_json` gives a JSON-ready `dict` (tuples become
lists, nested records objects, and records with a `TYPE` gain their `"type"`); `from_json` checks
every field's presence and type from the dataclass's annotations and raises
[ReportError][randfeat.eval.errors.ReportError] naming the field otherwise. A field with a default
(one added in a later version) is left out while it holds its default, and may be absent.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import ClassVar, Literal, TypeVar, Union, get_args, get_origin

from randfeat.eval.errors import ReportError

__all__ = ["JSONObject", "Record", "brief"]

JSONObject = dict[str, object]
"""A JSON object as `json.loads` returns it."""

R = TypeVar("R", bound="Record")


class Record:
    """`to_json` / `from_json` for a frozen dataclass of JSON-typed fields.

    Subclass it with a `@dataclass(frozen=True)` whose fields are `int`, `float`, `str`, `bool`,
    `None`, `Literal`s, unions of those, `tuple[X, ...]`, `Mapping[str, X]` and other records;
    set `TYPE` to write a `"type"` with the record.
    """

    TYPE: ClassVar[str | None] = None  # the "type" written with the record, if any

    def to_json(self) -> JSONObject:
        """The record as a JSON-ready `dict` (field order kept; `"type"` first for rows; a field
        with a default is left out while it holds that default)."""
        out: JSONObject = {} if self.TYPE is None else {"type": self.TYPE}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue  # a field added later is written only when used (older readers agree)
            out[f.name] = _encode(value)
        return out

    @classmethod
    def from_json(cls: type[R], data: object) -> R:
        """Build the record from a parsed JSON object, checking every field.

        Raises:
            ReportError: `data` is not an object, lacks a field, has a field of the wrong type or
                an unknown field, or carries another `"type"`.
        """
        name = cls.TYPE or cls.__name__
        if not isinstance(data, Mapping):
            raise ReportError(f"Expected a {name} record (a JSON object), but got {brief(data)}.")
        if cls.TYPE is not None and data.get("type") != cls.TYPE:
            raise ReportError(
                f"Expected a record of type {cls.TYPE!r}, but got {data.get('type')!r}."
            )
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - fields - {"type"})
        if unknown:
            raise ReportError(
                f"The {name} record has unknown field(s) {', '.join(unknown)}; expected "
                f"{', '.join(sorted(fields))}. Was it written by another randfeat version?"
            )
        # a field with a default (added in a later version) may be absent
        optional = {
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is not dataclasses.MISSING
        }
        missing = [f for f in sorted(fields - optional) if f not in data]
        if missing:
            raise ReportError(f"The {name} record lacks field(s) {', '.join(missing)}.")
        values = {f: _decode(hints[f], data[f], f"{name}.{f}") for f in fields if f in data}
        return cls(**values)


def _encode(value: object) -> object:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _decode(tp: object, value: object, where: str) -> object:
    """`value` checked against the type `tp` (and converted: lists to tuples, objects to records)."""
    origin = get_origin(tp)
    if tp is object:
        return value
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_json(value)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _decode(arg, value, where)
            except ReportError as err:
                errors.append(err)
        raise errors[-1]
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ReportError(
            f"Expected `{where}` to be one of {get_args(tp)}, but got {brief(value)}."
        )
    if origin is tuple:
        if not isinstance(value, list):
            raise ReportError(f"Expected `{where}` to be a list, but got {brief(value)}.")
        (item, _) = get_args(tp)
        return tuple(_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ReportError(f"Expected `{where}` to be an object, but got {brief(value)}.")
        _, item = get_args(tp)
        return {str(k): _decode(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise ReportError(f"Expected `{where}` to be null, but got {brief(value)}.")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ReportError(f"Expected `{where}` to be {name}, but got {brief(value)}.")
