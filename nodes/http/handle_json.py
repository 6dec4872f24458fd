"""Values in the HANDLE.NET REST API's JSON, both ways (HANDLE-INTEROP.md A.4, A.5).

This is HSJ's form, not ``resolver.json_form``'s: permissions as four characters
(adminRead, adminWrite, publicRead, publicWrite) and only when they differ from ``1110``; HS_ADMIN
data as ``{"format": "admin", "value": {"handle", "index", "permissions"}}`` with twelve
permission characters, LIST_HDLS first; absolute TTLs as ISO strings; unknown members ignored on
input. The node stores HS_ADMIN data as its own JSON grant (``resolver.record.admin_value``); it
is converted here, at the edge, both ways.

Everything that is wrong with a request body raises ``HandleFailure`` with the response code a
Handle client expects (``nodes.http.codes``); nothing here touches the store.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from typing import Any

from nodes.http.codes import RC, HandleFailure
from resolver.errors import InvalidValue
from resolver.record import (
    ADMIN_TYPE,
    DEFAULT_PERMISSIONS,
    DEFAULT_TTL,
    MAX_INDEX,
    AdminPermission,
    Permission,
    Reference,
    TtlType,
    Value,
    admin_value,
    grant_of,
)

_PERMISSION_CHARS = (Permission.ADMIN_READ, Permission.ADMIN_WRITE, Permission.PUBLIC_READ, Permission.PUBLIC_WRITE)
_ADMIN_BITS = 12
_HANDLE_INDEX_MAX = 2**31 - 1
"""Handle clients read indexes as signed 32-bit integers (HANDLE-INTEROP.md A.13.5)."""


def _iso(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _from_iso(text: str, where: str) -> int:
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise HandleFailure(RC.INVALID_VALUE, f"{where}: {text!r} is not an ISO-8601 time") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp())


def permissions_text(permissions: Permission) -> str:
    return "".join("1" if permissions & bit else "0" for bit in _PERMISSION_CHARS)


def admin_permissions_text(permissions: AdminPermission) -> str:
    return "".join("1" if permissions & (1 << bit) else "0" for bit in reversed(range(_ADMIN_BITS)))


def _looks_like_text(data: bytes) -> str | None:
    """The data as text when HSJ would show it as a string (``Util.looksLikeBinary``)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(b <= 0x08 or 0x14 <= b <= 0x1F or b == 0x7F for b in data):
        return None
    return text


def _data_out(value: Value) -> dict[str, Any]:
    if value.type == ADMIN_TYPE:
        try:
            grant = grant_of(value)
        except InvalidValue:
            pass  # shown as it is stored, like HSJ does with admin data it cannot decode
        else:
            permissions = admin_permissions_text(grant.permissions)
            admin = {"handle": grant.admin, "index": grant.index, "permissions": permissions}
            return {"format": "admin", "value": admin}
    text = _looks_like_text(value.data)
    if text is not None:
        return {"format": "string", "value": text}
    return {"format": "base64", "value": base64.b64encode(value.data).decode("ascii")}


def compact_json(body: Any) -> str:
    """A JSON body as HSJ sends it: compact, non-ASCII as is (every answer of the HTTP API and
    page, and the bytes the GET cache keeps)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def value_to_json(value: Value) -> dict[str, Any]:
    """One value as HSJ serialises it (members in HSJ's order)."""
    out: dict[str, Any] = {"index": value.index, "type": value.type, "data": _data_out(value)}
    if value.permissions != DEFAULT_PERMISSIONS:
        out["permissions"] = permissions_text(value.permissions)
    out["ttl"] = _iso(value.ttl) if value.ttl_type is TtlType.ABSOLUTE else value.ttl
    if value.timestamp:
        out["timestamp"] = _iso(value.timestamp)
    if value.references:
        out["references"] = [{"handle": r.identifier, "index": r.index} for r in value.references]
    return out


# --- client -> server ---------------------------------------------------------------------------


def _integer(obj: Any, where: str, rc: RC = RC.INVALID_VALUE) -> int:
    """A JSON number or numeric string, as Gson reads an int."""
    if isinstance(obj, bool):
        raise HandleFailure(rc, f"{where} must be a number")
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    if isinstance(obj, str):
        try:
            return int(obj.strip())
        except ValueError:
            pass
    raise HandleFailure(rc, f"{where} must be a number, not {json.dumps(obj)[:40]}")


def _admin_permissions(obj: Any, where: str) -> AdminPermission:
    """HS_ADMIN permissions in any form HSJ accepts (A.5)."""
    if obj == "*" or obj is True:
        return AdminPermission(0xFFF)
    if obj is False:
        return AdminPermission(0)
    if isinstance(obj, int) and not isinstance(obj, bool):
        return AdminPermission(obj & 0xFFF)
    if isinstance(obj, str) and len(obj) <= _ADMIN_BITS and set(obj) <= {"0", "1"}:
        return AdminPermission(int(obj, 2) if obj else 0)
    if isinstance(obj, list) and len(obj) <= _ADMIN_BITS:
        return AdminPermission(sum(1 << bit for bit, item in enumerate(obj) if item))
    raise HandleFailure(RC.INVALID_VALUE, f"{where}: admin permissions {json.dumps(obj)[:40]} are not understood")


def _admin_data(obj: Any, where: str) -> bytes:
    if not isinstance(obj, dict) or not isinstance(obj.get("handle"), str):
        raise HandleFailure(RC.INVALID_VALUE, f'{where}: admin data must be {{"handle", "index", "permissions"}}')
    index = _integer(obj.get("index", 0), f"{where}: admin index")
    permissions = _admin_permissions(obj.get("permissions", "*"), where)
    return admin_value(0, obj["handle"], index, permissions).data


def _utf8(text: str, where: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
        raise HandleFailure(RC.INVALID_VALUE, f"{where}: text is not valid Unicode") from None


def _data_in(type_: str, data: Any, where: str) -> bytes:
    if isinstance(data, str):
        return _utf8(data, where)
    if not isinstance(data, dict) or not isinstance(data.get("format"), str):
        raise HandleFailure(RC.INVALID_VALUE, f'{where}: data must be a string or {{"format", "value"}}')
    kind, value = data["format"].lower(), data.get("value")
    if kind == "admin":
        return _admin_data(value, where)
    if kind == "string" and isinstance(value, str):
        return _utf8(value, where)
    try:
        if kind == "base64" and isinstance(value, str):
            return base64.b64decode(value, validate=True)
        if kind == "hex" and isinstance(value, str):
            return bytes.fromhex(value)
    except (binascii.Error, ValueError) as exc:
        raise HandleFailure(RC.INVALID_VALUE, f"{where}: data is not valid {kind}") from exc
    if kind in ("vlist", "site", "key"):
        raise HandleFailure(RC.INVALID_VALUE, f"{where}: data format {kind!r} is not supported by this node")
    raise HandleFailure(RC.PROTOCOL_ERROR, f"{where}: unknown data format {data['format']!r}")


def _value_permissions(obj: Any, where: str) -> Permission:
    if obj is None:
        return DEFAULT_PERMISSIONS
    if obj == "*":
        return Permission(0xF)
    if not isinstance(obj, str) or not set(obj) <= {"0", "1"}:
        raise HandleFailure(RC.INVALID_VALUE, f"{where}: permissions must be a string of 0 and 1, or *")
    bits = int(DEFAULT_PERMISSIONS)
    # HSJ's rule: the last four characters, each applied only when the string is longer than
    # its distance from the end (so a one-character string changes nothing).
    for k, bit in enumerate(reversed(_PERMISSION_CHARS)):  # k = 0: publicWrite, the last character
        if len(obj) > k + 1 or (len(obj) == 4 and k == 3):
            char = obj[len(obj) - 1 - k]
            bits = bits | bit if char == "1" else bits & ~bit
    return Permission(bits)


def _ttl(obj: Any, where: str) -> tuple[int, TtlType]:
    if obj is None:
        return DEFAULT_TTL, TtlType.RELATIVE
    if isinstance(obj, str) and not obj.strip().lstrip("-").isdigit():
        return _from_iso(obj, where), TtlType.ABSOLUTE
    return _integer(obj, f"{where}: ttl"), TtlType.RELATIVE


def _references(obj: Any, where: str) -> tuple[Reference, ...]:
    if obj is None:
        return ()
    if not isinstance(obj, list):
        raise HandleFailure(RC.INVALID_VALUE, f"{where}: references must be a list")
    out = []
    for r in obj:
        if not isinstance(r, dict) or not isinstance(r.get("handle"), str):
            raise HandleFailure(RC.INVALID_VALUE, f'{where}: a reference must be {{"handle", "index"}}')
        _utf8(r["handle"], f"{where}: reference")
        out.append(Reference(r["handle"], _integer(r.get("index", 0), f"{where}: reference index")))
    return tuple(out)


def value_from_json(obj: Any, where: str = "value") -> Value:
    """One value as a Handle client sends it; unknown members are ignored, as Gson does."""
    if not isinstance(obj, dict):
        raise HandleFailure(RC.PROTOCOL_ERROR, f"{where}: a value must be a JSON object")
    index = _integer(obj.get("index"), f"{where}: index")
    if index <= 0:
        raise HandleFailure(RC.INVALID_VALUE, f"{where}: indexes must be positive")
    if index > min(MAX_INDEX, _HANDLE_INDEX_MAX):
        raise HandleFailure(RC.INVALID_VALUE, f"{where}: index {index} is beyond {_HANDLE_INDEX_MAX}")
    type_ = obj.get("type")
    if not isinstance(type_, str):
        raise HandleFailure(RC.INVALID_VALUE, f"{where}: type must be a string")
    _utf8(type_, f"{where}: type")
    ttl, ttl_type = _ttl(obj.get("ttl"), where)
    return Value(
        index=index,
        type=type_,
        data=_data_in(type_, obj.get("data", ""), where),
        ttl=ttl,
        ttl_type=ttl_type,
        permissions=_value_permissions(obj.get("permissions"), where),
        references=_references(obj.get("references"), where),
    )


def values_of_body(body: Any) -> tuple[list[Value], str | None]:
    """The values of a PUT body in any of its three shapes (A.5), and the handle it names if
    any: ``{"values": [...]}``, a bare list, or one value object."""
    named: str | None = None
    if isinstance(body, dict) and "values" in body:
        if body.get("handle") is not None:
            if not isinstance(body["handle"], str):
                raise HandleFailure(RC.PROTOCOL_ERROR, "Mismatched handle in PUT request")
            named = body["handle"]
        items = body["values"]
    elif isinstance(body, list):
        items = body
    elif isinstance(body, dict) and {"index", "type", "data"} <= body.keys():
        items = [body]
    else:
        raise HandleFailure(RC.PROTOCOL_ERROR, "Invalid JSON in PUT request")
    if not isinstance(items, list):
        raise HandleFailure(RC.PROTOCOL_ERROR, "Invalid JSON in PUT request")
    values = [value_from_json(item, f"values[{n}]") for n, item in enumerate(items)]
    seen: set[int] = set()
    for v in values:
        if v.index in seen:
            raise HandleFailure(RC.VALUE_ALREADY_EXISTS, f"Index conflict for {v.index}")
        seen.add(v.index)
    return values, named
