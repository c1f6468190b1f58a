"""A small JSON Schema validator for the keywords structured-output rewards need.

Why not ``jsonschema``: it is not a dependency of preftune, and a reward for "answer in this JSON shape" needs
only a handful of keywords. Supported: ``type`` (string or list), ``enum``, ``const``, ``properties``,
``required``, ``additionalProperties`` (bool or schema), ``items`` (one schema), ``minItems``, ``maxItems``,
``minLength``, ``maxLength``, ``pattern``, ``minimum``, ``maximum``, ``exclusiveMinimum``,
``exclusiveMaximum``, ``anyOf``. Annotations (``title``, ``description``, ``$schema``, ``default``,
``examples``, ``$id``) are ignored. Any other keyword is rejected when the schema is checked, because a
silently ignored constraint would reward outputs that violate it.
"""

from __future__ import annotations

import re
from typing import Any

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
    ),
}
_CHECKED = {
    "type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "anyOf",
}  # fmt: skip
_ANNOTATIONS = {"title", "description", "$schema", "default", "examples", "$id", "$comment"}


def check_schema(schema: dict[str, Any], path: str = "#") -> None:
    """Raise ValueError if ``schema`` uses a keyword or type this validator does not implement."""
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: a schema must be an object, got {type(schema).__name__}")
    unknown = set(schema) - _CHECKED - _ANNOTATIONS
    if unknown:
        raise ValueError(
            f"{path}: unsupported JSON Schema keyword(s) {sorted(unknown)}; supported: {sorted(_CHECKED)}"
        )
    types = schema.get("type", [])
    for t in [types] if isinstance(types, str) else types:
        if t not in _TYPES:
            raise ValueError(f"{path}: unknown type {t!r}")
    for key, sub in schema.get("properties", {}).items():
        check_schema(sub, f"{path}/properties/{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            check_schema(schema[key], f"{path}/{key}")
    for i, sub in enumerate(schema.get("anyOf", [])):
        check_schema(sub, f"{path}/anyOf/{i}")


def validate_json_schema(instance: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Every violation of ``schema`` by ``instance``, as ``"<json path>: <what>"`` strings; empty when valid."""
    errors: list[str] = []
    if "type" in schema:
        types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(_TYPES[t](instance) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(instance).__name__}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} not in {schema['enum']!r}")
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}")
    if "anyOf" in schema and not any(not validate_json_schema(instance, s, path) for s in schema["anyOf"]):
        errors.append(f"{path}: matches none of anyOf")
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        errors += [f"{path}: missing required {k!r}" for k in schema.get("required", []) if k not in instance]
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in props:
                errors += validate_json_schema(value, props[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected property {key!r}")
            elif isinstance(extra, dict):
                errors += validate_json_schema(value, extra, f"{path}.{key}")
    if isinstance(instance, list):
        if "minItems" in schema and len(instance) < schema["minItems"]:
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(instance) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(instance):
                errors += validate_json_schema(item, schema["items"], f"{path}[{i}]")
    if isinstance(instance, str):
        if "minLength" in schema and len(instance) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(instance) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']}")
        if "pattern" in schema and re.search(schema["pattern"], instance) is None:
            errors.append(f"{path}: does not match pattern {schema['pattern']!r}")
    if _TYPES["number"](instance):
        bounds = (
            ("minimum", lambda b: instance >= b), ("maximum", lambda b: instance <= b),
            ("exclusiveMinimum", lambda b: instance > b), ("exclusiveMaximum", lambda b: instance < b),
        )  # fmt: skip
        errors += [
            f"{path}: violates {k} {schema[k]}" for k, ok in bounds if k in schema and not ok(schema[k])
        ]
    return errors
