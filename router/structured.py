"""Structured outputs at the router: OpenAI's `response_format` (and the schemas tool calling constrains
arguments with) -> `replicas.engine.protocol.StructuredOutput`, after checking that the engine's grammar library
enforces every JSON Schema keyword the schema uses. A keyword it would silently ignore is a 400 that names it:
output that does not validate must never be answered with a 200.
"""
from __future__ import annotations

import json
from typing import Any

from replicas.engine.protocol import StructuredOutput
from router.errors import bad_request

# Keywords the grammar enforces (xgrammar's JSON Schema converter), and annotations that constrain nothing.
ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "enum", "const", "anyOf",
    "oneOf", "$ref", "$defs", "definitions", "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern", "format", "minProperties", "maxProperties",
}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly"}
FORMATS = {"email", "date", "time", "date-time", "duration", "uuid", "ipv4", "ipv6", "hostname", "uri",
           "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"}
# Keywords whose value is a schema, a list of schemas, or a map of name -> schema.
_SUB = {"items", "additionalProperties"}
_SUB_LIST = {"anyOf", "oneOf", "prefixItems"}
_SUB_MAP = {"properties", "$defs", "definitions"}


def unsupported_features(schema: Any, path: str = "#") -> list[str]:
    """JSON Schema features of `schema` the grammar would not enforce, as `keyword at path`."""
    out: list[str] = []
    if isinstance(schema, bool):
        return out
    if not isinstance(schema, dict):
        return [f"a non-object schema at {path}"]
    for key, value in schema.items():
        where = f"{path}/{key}"
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED:
            out.append(f"{key} (at {path})")
        elif key == "format" and value not in FORMATS:
            out.append(f"format {value!r} (at {path})")
        elif key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            out.append(f"a non-local $ref (at {path})")
        elif key in _SUB and isinstance(value, (dict, bool)):
            out += unsupported_features(value, where)
        elif key in _SUB_LIST and isinstance(value, list):
            for i, sub in enumerate(value):
                out += unsupported_features(sub, f"{where}/{i}")
        elif key in _SUB_MAP and isinstance(value, dict):
            for name, sub in value.items():
                out += unsupported_features(sub, f"{where}/{name}")
    return out


def json_schema_output(schema: Any, param: str) -> StructuredOutput:
    """A JSON Schema the output must satisfy, checked; `param` names it in errors."""
    if not isinstance(schema, dict):
        raise bad_request(f"{param} must be a JSON Schema object", param=param)
    bad = unsupported_features(schema)
    if bad:
        raise bad_request(f"{param} uses JSON Schema features this server cannot enforce: {', '.join(bad)}",
                          param=param, code="unsupported_schema")
    return StructuredOutput(kind="json_schema", json_schema=json.dumps(schema, sort_keys=True))


def response_format_output(fmt) -> StructuredOutput | None:
    """router.protocol.ResponseFormat -> the engine's StructuredOutput (None: plain text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput(kind="json_object")
    if fmt.json_schema is None:
        raise bad_request("response_format.json_schema is required for type json_schema",
                          param="response_format.json_schema")
    schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
    return json_schema_output(schema, "response_format.json_schema.schema")
