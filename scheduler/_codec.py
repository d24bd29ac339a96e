"""JSON for the scheduler's events and answers: ``{"type": "<ClassName>", ...fields}``.

The same codec runs on both sides (the daemon imports it), so the wire format is exactly
the dataclasses in ``_events``.  Decoding validates every field's type; anything else is
a :class:`ValueError` (the service answers 400).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from . import _events as ev

__all__ = ["decode_answer", "decode_event", "encode"]

_EVENTS: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        ev.RegisterHost,
        ev.Heartbeat,
        ev.LeaveHost,
        ev.StartTask,
        ev.Announce,
        ev.ReportPieces,
        ev.ReportPieceFailure,
        ev.CompleteTask,
        ev.BlobMismatch,
        ev.LeaveTask,
        ev.Assign,
    )
}
_ANSWERS: dict[str, type[Any]] = {
    cls.__name__: cls for cls in (ev.Ack, ev.Unknown, ev.Rejected, ev.Assignment)
}
_MAX_LIST = 1 << 20
_MAX_INT = (1 << 63) - 1  # sizes, indices, counts: anything larger is not a real one


_ADDED_LATER = frozenset({("Assign", "wait")})
"""Fields added after the first release: left out while at their default, so that an
older scheduler (which refuses unknown fields) still understands the message."""


def encode(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict for an event or an answer."""
    name = type(obj).__name__
    out: dict[str, Any] = {"type": name}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if (name, f.name) in _ADDED_LATER and value == f.default:
            continue
        out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def decode_event(data: Any) -> ev.Event:
    return typing.cast(ev.Event, _decode(data, _EVENTS, "event"))


def decode_answer(data: Any) -> ev.Answer:
    return typing.cast(ev.Answer, _decode(data, _ANSWERS, "answer"))


def _decode(data: Any, table: dict[str, type[Any]], what: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object")
    name = data.get("type")
    cls = table.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown {what} type {name!r}")
    return _build(cls, {k: v for k, v in data.items() if k != "type"}, str(name))


_SHAPES: dict[type[Any], tuple[dict[str, Any], frozenset[str]]] = {}


def _shape(cls: type[Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """A dataclass's field types and names (resolving the hints is slow: once per class)."""
    shape = _SHAPES.get(cls)
    if shape is None:
        hints = typing.get_type_hints(cls, vars(ev))
        shape = _SHAPES[cls] = (hints, frozenset(f.name for f in dataclasses.fields(cls)))
    return shape


def _build(cls: type[Any], data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object")
    hints, fields = _shape(cls)
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{where}: invalid value")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: expected one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list) or len(value) > _MAX_LIST:
            raise ValueError(f"{where}: expected a list")
        inner = args[0] if args else Any
        items = [_convert(inner, v, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or origin is typing.get_origin(Mapping[str, str]):
        if not isinstance(value, dict) or len(value) > _MAX_LIST:
            raise ValueError(f"{where}: expected an object")
        ktype, vtype = args
        return {_convert(ktype, k, where): _convert(vtype, v, where) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type[Any], tp), value, where)
    if tp is int:
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 12:
            return int(value)  # JSON object keys
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer")
        if not -_MAX_INT <= value <= _MAX_INT:
            raise ValueError(f"{where}: integer out of range")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number")
        if isinstance(value, int) and not -_MAX_INT <= value <= _MAX_INT:
            raise ValueError(f"{where}: number out of range")  # float() would overflow
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or len(value) > 4096:
            raise ValueError(f"{where}: expected a string")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false")
        return value
    if tp is Any:
        return value
    raise ValueError(f"{where}: unsupported type {tp!r}")
