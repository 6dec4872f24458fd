"""The JSON form of records, shaped like the HANDLE.NET REST API so users recognise it.

    {"identifier": "88.100.1/SN-1", "version": 3,
     "values": [{"index": 1, "type": "URL",
                 "data": {"format": "string", "value": "https://example.com"},
                 "ttl": 86400, "timestamp": "2026-11-28T00:00:00Z", "permissions": "0x0e"}]}

Data that is not UTF-8 text is given as ``{"format": "base64", "value": ...}``. The same shape
(without version and timestamps) is accepted by ``idis register --file`` in JSON Lines.
"""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

from resolver.errors import InvalidValue
from resolver.record import DEFAULT_PERMISSIONS, DEFAULT_TTL, Permission, Record, Reference, TtlType, Value


def _data_to_json(data: bytes) -> dict[str, str]:
    try:
        return {"format": "string", "value": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"format": "base64", "value": base64.b64encode(data).decode("ascii")}


def value_to_json(v: Value) -> dict[str, Any]:
    out: dict[str, Any] = {"index": v.index, "type": v.type, "data": _data_to_json(v.data), "ttl": v.ttl}
    if v.ttl_type is TtlType.ABSOLUTE:
        out["ttl_type"] = "absolute"
    if v.timestamp:
        try:
            out["timestamp"] = dt.datetime.fromtimestamp(v.timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OverflowError, ValueError, OSError):  # beyond year 9999: give the raw seconds
            out["timestamp"] = v.timestamp
    out["permissions"] = f"0x{int(v.permissions):02x}"
    if v.references:
        out["references"] = [{"identifier": r.identifier, "index": r.index} for r in v.references]
    return out


def record_to_json(record: Record) -> dict[str, Any]:
    return {
        "identifier": str(record.identifier),
        "version": record.version,
        "values": [value_to_json(v) for v in record.values],
    }


def _data_from_json(where: str, data: Any) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, dict) and data.get("format") in ("string", "base64") and isinstance(data.get("value"), str):
        if data["format"] == "string":
            return str(data["value"]).encode("utf-8")
        try:
            return base64.b64decode(data["value"], validate=True)
        except ValueError as exc:
            raise InvalidValue(f"{where}: data is not valid base64") from exc
    raise InvalidValue(f'{where}: data must be a string or {{"format": "string"|"base64", "value": ...}}')


def value_from_json(obj: Any, default_index: int, where: str = "value") -> Value:
    """A value from its JSON form; the index defaults to ``default_index``."""
    if not isinstance(obj, dict):
        raise InvalidValue(f"{where}: expected an object")
    unknown = set(obj) - {"index", "type", "data", "ttl", "ttl_type", "permissions", "references", "timestamp"}
    if unknown:
        raise InvalidValue(f"{where}: unknown field {sorted(unknown)[0]!r}")
    index = obj.get("index", default_index)
    type_ = obj.get("type")
    ttl = obj.get("ttl", DEFAULT_TTL)
    if not isinstance(index, int) or isinstance(index, bool):
        raise InvalidValue(f"{where}: index must be an integer")
    if not isinstance(type_, str):
        raise InvalidValue(f"{where}: type must be a string")
    if not isinstance(ttl, int) or isinstance(ttl, bool):
        raise InvalidValue(f"{where}: ttl must be an integer")
    permissions = obj.get("permissions", int(DEFAULT_PERMISSIONS))
    if isinstance(permissions, str):
        try:
            permissions = int(permissions, 0)
        except ValueError as exc:
            raise InvalidValue(f"{where}: permissions {permissions!r} is not a number") from exc
    if not isinstance(permissions, int) or permissions & ~0xF:
        raise InvalidValue(f"{where}: permissions must be a 4-bit mask")
    refs = obj.get("references", [])
    if not isinstance(refs, list) or not all(
        isinstance(r, dict) and isinstance(r.get("identifier"), str) and isinstance(r.get("index"), int) for r in refs
    ):
        raise InvalidValue(f"{where}: references must be a list of {{identifier, index}}")
    return Value(
        index=index,
        type=type_,
        data=_data_from_json(where, obj.get("data", "")),
        ttl=ttl,
        ttl_type=TtlType.ABSOLUTE if obj.get("ttl_type") == "absolute" else TtlType.RELATIVE,
        permissions=Permission(permissions),
        references=tuple(Reference(r["identifier"], r["index"]) for r in refs),
    )


def values_from_json(objs: Any, where: str = "values") -> tuple[Value, ...]:
    if not isinstance(objs, list):
        raise InvalidValue(f"{where}: expected a list")
    return tuple(value_from_json(o, i + 1, f"{where}[{i}]") for i, o in enumerate(objs))
