"""Spark: the record value's schema as a `StructType`, in the JSON form `StructType.json()` writes and
`StructType.fromJson` (PySpark) or `DataType.fromJson` (Scala) reads, for `from_json(value, schema)`.

`EventTime` is a string (Tencent sends an integer or its decimal string, and Spark's JSON reader keeps a
number's text in a string field but nulls a string in a long one): cast it, `CAST(callback.EventTime AS
BIGINT)`. Arrays and objects the registry does not type are strings holding their JSON text (Spark's JSON
reader does that for a string field), read with `get_json_object` or `from_json`.
"""

from __future__ import annotations

from typing import Any

from bridge.schema.flink import QUERY_FIELDS
from bridge.schema.model import Kind, Selection


def _field(name: str, data_type: Any, *, nullable: bool = True, comment: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "type": data_type,
        "nullable": nullable,
        "metadata": {"comment": comment} if comment else {},
    }


def _struct(fields: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "struct", "fields": fields}


_MSG_ELEMENT = _struct([_field("MsgType", "string"), _field("MsgContent", "string")])
_TYPES: dict[Kind, Any] = {
    Kind.STRING: "string",
    Kind.NON_EMPTY_STRING: "string",
    Kind.INTEGER: "long",
    Kind.EVENT_TIME: "string",
    Kind.ARRAY: "string",
    Kind.OBJECT: "string",
    Kind.ANY: "string",
    Kind.MSG_BODY: {"type": "array", "elementType": _MSG_ELEMENT, "containsNull": True},
}
_COMMENTS = {
    Kind.EVENT_TIME: "milliseconds since the epoch, an integer or its decimal string: CAST(... AS BIGINT)",
    Kind.ARRAY: "JSON text of an array",
    Kind.OBJECT: "JSON text of an object",
    Kind.ANY: "JSON text: commands of this selection type it differently",
}


def struct_type(selection: Selection) -> dict[str, Any]:
    """The `StructType` of the record value, as `StructType.jsonValue()` gives it."""
    callback = [_field("CallbackCommand", "string")] + [
        _field(field.name, _TYPES[field.kind], nullable=True, comment=_COMMENTS.get(field.kind))
        for field in selection.column_fields
    ]
    return _struct(
        [
            _field("schema", "string"),
            _field("received_at", "long", comment="receive time, milliseconds since the epoch"),
            _field("query", _struct([_field(name, "string") for name in QUERY_FIELDS])),
            _field("callback", _struct(callback)),
        ]
    )
