"""Structural validation against the JSON Schema (``avdsl/schema.json``, draft 2020-12).

The schema is the one description of what keys a spec may have; `avdsl schema` prints it, editors use
it (YAML language server), and the spec reference in the docs is generated from it. Errors become a
`SpecError` at the line of the offending key, with a did-you-mean hint for unknown keys and values.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import jsonschema

from . import ops
from .diagnostics import SpecError, did_you_mean
from .loader import Doc


# keys whose value is an operator call -> which catalogue operators it takes
OPERATOR_KEYS = {
    ("stream", "tokenizer"): lambda op: op.category == "tokenizer",
    ("stream", "position"): lambda op: op.category == "position",
    ("stream", "drop"): lambda op: op.category == "drop" and not op.writes_mask,
    ("stream", "mask"): lambda op: op.category == "drop" and op.writes_mask,
    ("", "outputs"): lambda op: op.category in ("pool", "project", "target"),
    ("", "losses"): lambda op: op.category == "loss",
}


@lru_cache(maxsize=1)
def schema() -> dict:
    """The JSON Schema, with the operators each call-valued key takes listed from the catalogue."""
    root = json.loads(resources.files("avdsl").joinpath("schema.json").read_text())
    for (definition, key), takes in OPERATOR_KEYS.items():
        node = (root["$defs"][definition] if definition else root)["properties"][key]
        names = ", ".join(f"`{op.name}`" for op in ops.OPS.values() if takes(op))
        node["description"] = f"{node['description']} Operators: {names}."
    return root


def schema_text() -> str:
    return json.dumps(schema(), indent=2)


def _subschema(path: tuple) -> dict:
    """The schema that applies at a path of the data (following properties/additionalProperties)."""
    root = schema()
    node = root
    for part in path:
        if "$ref" in node:
            node = root["$defs"][node["$ref"].rsplit("/", 1)[1]]
        if isinstance(part, int):
            node = node.get("items", {})
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        else:
            node = node.get("additionalProperties", {}) if isinstance(node.get("additionalProperties"), dict) else {}
    if "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "nothing (null)"}.get(type(value), type(value).__name__)


def _error_to_spec_error(err: jsonschema.ValidationError, doc: Doc) -> SpecError:
    path = tuple(err.absolute_path)
    where = ".".join(map(str, path)) or "the top level"
    validator = err.validator
    if validator == "additionalProperties":
        allowed = list(_subschema(path).get("properties", {}))
        extra = [k for k in (err.instance or {}) if k not in allowed]
        key = extra[0] if extra else "?"
        hint = did_you_mean(key, allowed, "a key")
        if not str(key).replace("_", "a").isalnum():  # `{tokenizer: patch2d(16, 16)}` splits at the comma
            hint = "inside `{...}` a comma ends the value: quote values that hold commas, e.g. `{tokenizer: \"patch2d(16, 16)\"}`"
        return SpecError(doc.key_loc(*path, key), f"unknown key '{key}' in {where}", hint)
    if validator == "propertyNames":
        bad = [k for k in err.instance if isinstance(k, str)] if isinstance(err.instance, dict) else []
        key = next((k for k in bad if not k.replace("_", "a").isalnum() or k[0].isdigit()), err.instance)
        return SpecError(doc.key_loc(*path, key) if isinstance(key, str) else doc.loc(*path),
                         f"'{key}' is not a valid name in {where}",
                         "names start with a letter or '_' and hold letters, digits and '_'")
    if validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return SpecError(doc.key_loc(*path) if path else doc.loc(), f"{where} is missing the required key '{missing}'",
                         _required_hint(missing))
    if validator == "oneOf" and path and len(path) == 2 and path[0] == "streams":
        present = [k for k in ("input", "from", "latent") if k in (err.instance or {})]
        msg = (f"stream '{path[1]}' says where its tokens come from more than once ({', '.join(present)})" if present
               else f"stream '{path[1]}' does not say where its tokens come from")
        return SpecError(doc.key_loc(*path), msg,
                         "give exactly one of `input: NAME` (tokenize an input), `from: encoder.stream`, or `latent: N`")
    if path == ("avdsl",) and validator in ("enum", "const", "type"):
        return SpecError(doc.loc(*path), f"unsupported spec language version {err.instance!r}",
                         "this avdsl reads version 1 specs: write `avdsl: 1`")
    if validator == "enum" or validator == "const":
        options = err.validator_value if validator == "enum" else [err.validator_value]
        return SpecError(doc.loc(*path), f"{where} is {err.instance!r}, which is not allowed",
                         did_you_mean(err.instance, options, "a value"))
    if validator == "type":
        expected = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        words = " or ".join({"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
                             "array": "a list", "object": "a mapping"}.get(t, t) for t in expected)
        return SpecError(doc.loc(*path), f"{where} must be {words}, not {_type_name(err.instance)}",
                         _type_hint(path, expected))
    if validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        bound = {"minimum": "at least", "exclusiveMinimum": "more than", "maximum": "at most",
                 "exclusiveMaximum": "less than"}[validator]
        return SpecError(doc.loc(*path), f"{where} is {err.instance}, but it must be {bound} {err.validator_value}",
                         "sizes and counts are positive; check for a typo in the number")
    if validator in ("minItems", "minProperties"):
        return SpecError(doc.loc(*path), f"{where} is empty", "give at least one entry")
    if validator == "pattern":
        key_loc = doc.key_locs.get(path + (err.instance,)) if isinstance(err.instance, str) else None
        return SpecError(key_loc or doc.loc(*path), f"'{err.instance}' in {where} is not a valid name",
                         "names start with a letter or '_' and hold letters, digits and '_'")
    return SpecError(doc.loc(*path), f"{where}: {err.message}", "see `avdsl schema` for what is allowed here")


def _required_hint(key: str) -> str:
    return {
        "avdsl": "add `avdsl: 1` at the top of the spec",
        "inputs": "declare inputs, e.g. `inputs: [\"frames[B, 3, 8, 224, 224] : video\"]`",
        "streams": "declare token streams under `streams:`",
        "encoders": "declare at least one encoder under `encoders:`",
        "routing": "give the pass its routing rules, e.g. `routing: [text <- text]`",
    }.get(key, f"add `{key}:`; see `avdsl schema`")


def _type_hint(path: tuple, expected: list) -> str:
    if "array" in expected:
        return "write a YAML list: one `- item` per line, or `[a, b]`"
    if "object" in expected:
        return "write a mapping of `key: value` lines, indented under this key"
    if "string" in expected:
        return "quote the value to make it a string"
    return "see `avdsl schema` for what is allowed here"


def validate(doc: Doc) -> None:
    """Raise a `SpecError` for the first structural problem in ``doc`` (by position in the file)."""
    validator = jsonschema.Draft202012Validator(schema())
    errors = list(validator.iter_errors(doc.data))
    if not errors:
        return
    # oneOf on a stream hides the more useful errors inside the stream: prefer the specific ones
    specific = []
    for err in errors:
        if err.validator == "oneOf" and not isinstance(err.instance, dict):
            continue  # a stream that is not a mapping: its type error says so
        if err.validator == "oneOf" and err.context:
            inner = [e for e in err.context if e.validator not in ("required",)]
            specific.extend(inner or [err])
        else:
            specific.append(err)
    converted = [(_error_to_spec_error(e, doc), e) for e in specific]
    # a misspelled required key shows up twice (unknown + missing): the unknown key says more
    unknown_at = {tuple(e.absolute_path) for e in specific if e.validator == "additionalProperties"}

    def rank(pair):
        error, e = pair
        shadowed = e.validator == "required" and tuple(e.absolute_path) in unknown_at
        # at one place, a wrong type (a list where a mapping belongs) explains the other errors there
        return (error.loc.file != doc.file, shadowed, error.loc.line, error.loc.column, e.validator != "type")

    converted.sort(key=rank)
    raise converted[0][0]
