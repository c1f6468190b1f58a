"""JSON Schema validation for structured-output rewards, by the ``jsonschema`` package.

The whole standard: Draft 2020-12 unless the schema's ``$schema`` names another draft, so ``$ref`` / ``$defs``,
``oneOf`` / ``allOf`` / ``not``, ``patternProperties``, ``prefixItems``, ``uniqueItems``, ``dependentRequired``,
``if`` / ``then`` and ``format`` (checked, not only annotated) all work, with the standard's semantics (``true``
is not ``1`` in an ``enum``; ``2.0`` is an integer). What this module adds:

- :func:`check_schema` refuses a schema the verifier could not enforce: one invalid for its draft, a keyword
  the draft does not define anywhere in it (JSON Schema ignores unknown keywords, so a misspelt ``minLenght``
  would reward outputs that break it), or a ``format`` this installation cannot check.
- :func:`validate_json_schema` returns every violation as ``"<JSON path>: <what>"`` in a few words, one line
  per missing or unexpected property; a value of the wrong type reports only that.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from jsonschema import Draft202012Validator, exceptions, validators

# Keywords that take no part in validation but are part of the standard (core, meta-data, content).
_ANNOTATIONS = {"$schema", "$id", "$defs", "definitions", "$comment", "$anchor", "$dynamicAnchor", "$vocabulary",
                "$recursiveAnchor", "title", "description", "default", "examples", "deprecated", "readOnly",
                "writeOnly", "contentMediaType", "contentEncoding", "contentSchema", "id"}
_ONE = ("additionalProperties", "additionalItems", "items", "contains", "propertyNames", "not", "if", "then",
        "else", "unevaluatedItems", "unevaluatedProperties", "contentSchema")
_MANY = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")


def _validator_class(schema: dict):
    return validators.validator_for(schema, default=Draft202012Validator)


def _subschemas(schema: dict, path: str):
    """(path, subschema) of every schema nested in ``schema`` (boolean schemas skipped)."""
    for key in _ONE:
        if isinstance(schema.get(key), dict):
            yield f"{path}/{key}", schema[key]
    for key in _MANY:
        if isinstance(schema.get(key), list):
            yield from ((f"{path}/{key}/{i}", s) for i, s in enumerate(schema[key]) if isinstance(s, dict))
    for key in _MAP:
        if isinstance(schema.get(key), dict):
            yield from ((f"{path}/{key}/{k}", s) for k, s in schema[key].items() if isinstance(s, dict))


def check_schema(schema: dict[str, Any], path: str = "#") -> None:
    """Raise ValueError if ``schema`` is invalid, or uses a keyword or format that would not be enforced."""
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: a schema must be an object, got {type(schema).__name__}")
    cls = _validator_class(schema)
    if path == "#":
        try:
            cls.check_schema(schema)
        except exceptions.SchemaError as e:
            where = "/".join(str(p) for p in e.absolute_path)
            raise ValueError(f"#/{where}: invalid JSON Schema: {e.message}") from None
    known = set(cls.VALIDATORS) | _ANNOTATIONS
    unknown = sorted(set(schema) - known)
    if unknown:
        near = [m for k in unknown for m in difflib.get_close_matches(k, known, n=1)]
        hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
        raise ValueError(f"{path}: unknown JSON Schema keyword(s) {unknown}: they would be ignored, and outputs "
                         f"that break them rewarded{hint}")
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt not in cls.FORMAT_CHECKER.checkers:
        raise ValueError(f"{path}: format {fmt!r} cannot be checked in this installation (pip install "
                         f"'jsonschema[format]' adds the optional format checkers)")
    for sub_path, sub in _subschemas(schema, path):
        check_schema(sub, sub_path)


def _describe(error: exceptions.ValidationError) -> list[str]:
    """Short lines for one jsonschema error (several for ``required`` / ``additionalProperties``)."""
    kw, value, instance = error.validator, error.validator_value, error.instance
    if kw == "type":
        types = [value] if isinstance(value, str) else list(value)
        return [f"expected {' or '.join(types)}, got {type(instance).__name__}"]
    if kw == "required":
        return [f"missing required {k!r}" for k in value if isinstance(instance, dict) and k not in instance]
    if kw == "additionalProperties" and isinstance(instance, dict):
        props, patterns = error.schema.get("properties", {}), error.schema.get("patternProperties", {})
        return [f"unexpected property {k!r}" for k in instance
                if k not in props and not any(re.search(p, k) for p in patterns)]
    simple = {
        "minLength": f"shorter than {value}", "maxLength": f"longer than {value}",
        "minItems": f"fewer than {value} items", "maxItems": f"more than {value} items",
        "enum": f"{instance!r} not in {value!r}", "const": f"expected {value!r}",
        "pattern": f"does not match pattern {value!r}", "anyOf": "matches none of anyOf",
        "oneOf": ("matches more than one of oneOf" if "valid under each" in error.message
                  else "matches none of oneOf"),
        "uniqueItems": "has repeated items", "format": f"is not a valid {value}",
    }
    if kw in simple:
        return [simple[kw]]
    if kw in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
        return [f"violates {kw} {value}"]
    message = error.message
    return [message if len(message) <= 200 else message[:199] + "…"]


def validate_json_schema(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Every violation of ``schema`` by ``instance``, as ``"<json path>: <what>"`` strings; empty when valid."""
    cls = _validator_class(schema)
    errors = list(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(instance))
    mistyped = {e.json_path for e in errors if e.validator == "type"}  # the rest at that path would be noise
    lines = []
    for e in errors:
        if e.json_path in mistyped and e.validator != "type":
            continue
        lines += [f"{e.json_path}: {what}" for what in _describe(e)]
    return list(dict.fromkeys(lines))
