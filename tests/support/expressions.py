"""A small evaluator for the expression language of ARM templates (`[...]`, at deploy time) and of
Logic Apps' Workflow Definition Language (`@...` and `@{...}`, at run time): they share one
grammar of literals, function calls and `[...]` / `.name` / `?[...]` property access.

Only the functions the repository's templates use are implemented, each as its documentation
describes it; an unknown function is an error, so a template cannot use one this test cannot see.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

Function = Callable[..., Any]
_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+(?:\.\d+)?)|(?P<name>[A-Za-z_$][\w$]*)|(?P<sym>\?\[|\?\.|[()\[\],.]))"
)


class ExpressionError(Exception):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out, position = [], 0
    while position < len(text.rstrip()):
        match = _TOKEN.match(text, position)
        if not match:
            raise ExpressionError(f"cannot read {text[position:]!r}")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        position = match.end()
    return out


class _Parser:
    def __init__(self, text: str, functions: Mapping[str, Function]) -> None:
        self.tokens = _tokens(text)
        self.at = 0
        self.functions = functions

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            raise ExpressionError(f"expected {value!r}, found {token!r}")
        self.at += 1
        return token

    def expression(self) -> Any:
        kind, value = self.take()
        if kind == "str":
            result: Any = value[1:-1].replace("''", "'")
        elif kind == "num":
            result = float(value) if "." in value else int(value)
        elif kind == "name" and value in ("true", "false", "null") and (self.peek() or ("", ""))[1] != "(":
            result = {"true": True, "false": False, "null": None}[value]
        elif kind == "name":
            result = self.call(value)
        else:
            raise ExpressionError(f"unexpected {value!r}")
        return self.accessors(result)

    def call(self, name: str) -> Any:
        if name.lower() not in self.functions:
            raise ExpressionError(f"function {name}() is not implemented here")
        self.take("(")
        args = []
        while (self.peek() or ("", ""))[1] != ")":
            args.append(self.expression())
            if (self.peek() or ("", ""))[1] == ",":
                self.take(",")
        self.take(")")
        return self.functions[name.lower()](*args)

    def accessors(self, value: Any) -> Any:
        while (token := self.peek()) is not None and token[1] in ("[", "?[", ".", "?."):
            self.take()
            optional = token[1].startswith("?")
            if token[1].endswith("["):
                key = self.expression()
                self.take("]")
            else:
                key = self.take()[1]
            value = _member(value, key, optional)
        return value


def _member(value: Any, key: Any, optional: bool) -> Any:
    if value is None and optional:
        return None
    try:
        if isinstance(value, Mapping) and isinstance(key, str):
            lowered = {str(k).lower(): v for k, v in value.items()}  # property names are case-insensitive
            if key.lower() in lowered:
                return lowered[key.lower()]
            if optional:
                return None
            raise KeyError(key)
        return value[key]
    except (KeyError, IndexError, TypeError) as exc:
        raise ExpressionError(f"no member {key!r} in {value!r}") from exc


def evaluate(text: str, functions: Mapping[str, Function]) -> Any:
    parser = _Parser(text, functions)
    result = parser.expression()
    if parser.peek() is not None:
        raise ExpressionError(f"trailing {parser.peek()!r} in {text!r}")
    return result


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else json.dumps(value) if value is not None else ""


# --- Logic Apps (WDL), evaluated at run time ------------------------------------------------------
def wdl_functions(context: Mapping[str, Any]) -> dict[str, Function]:
    """`context`: parameters, triggerBody, items (by loop name), outputs and body (by action name),
    workflow."""

    def coalesce(*values: Any) -> Any:
        return next((v for v in values if v is not None), None)

    return {
        "parameters": lambda name: context["parameters"][name],
        "triggerbody": lambda: context["triggerBody"],
        "items": lambda name: context["items"][name],
        "item": lambda: context["item"],
        "body": lambda name: context["body"][name],
        "outputs": lambda name: context["outputs"][name],
        "workflow": lambda: context["workflow"],
        "listcallbackurl": lambda: "https://callback.invalid/",
        "encodeuricomponent": lambda s: urllib.parse.quote(_text(s), safe=""),
        "trim": lambda s: _text(s).strip(),
        "substring": lambda s, start, length=None: (
            _text(s)[start:] if length is None else _text(s)[start : start + length]
        ),
        "tolower": lambda s: _text(s).lower(),
        "startswith": lambda s, prefix: _text(s).startswith(_text(prefix)),
        "split": lambda s, sep: _text(s).split(_text(sep)),
        "last": lambda xs: xs[-1] if xs else None,
        "first": lambda xs: xs[0] if xs else None,
        "coalesce": coalesce,
        "json": lambda s: json.loads(s) if isinstance(s, str) else s,
        "concat": lambda *parts: "".join(_text(p) for p in parts),
        "empty": lambda v: v is None or len(v) == 0,
        "not": lambda v: not v,
        "and": lambda *vs: all(vs),
        "equals": lambda a, b: a == b,
        "string": _text,
    }


def wdl(value: Any, context: Mapping[str, Any]) -> Any:
    """A definition value as the engine sees it at run time: `@expr` is evaluated, `@{expr}` parts of
    a string are interpolated, `@@` escapes; objects and arrays are evaluated member by member."""
    functions = wdl_functions(context)
    if isinstance(value, dict):
        return {k: wdl(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [wdl(v, context) for v in value]
    if not isinstance(value, str) or "@" not in value:
        return value
    if value.startswith("@@"):
        return value[1:]
    if value.startswith("@") and not value.startswith("@{"):
        return evaluate(value[1:], functions)
    return re.sub(r"@\{(.*?)\}(?=[^}]|$)", lambda m: _text(evaluate(m.group(1), functions)), value)


# --- ARM templates, evaluated at deploy time ----------------------------------------------------
def arm_functions(parameters: Mapping[str, Any], variables: Mapping[str, Any]) -> dict[str, Function]:
    def union(*objects: Any) -> Any:
        merged: dict[str, Any] = {}
        for item in objects:
            merged.update(item)
        return merged

    return {
        "parameters": lambda name: parameters[name],
        "variables": lambda name: arm(variables[name], parameters, variables),
        "concat": lambda *parts: "".join(_text(p) for p in parts),
        "empty": lambda v: v is None or len(v) == 0,
        "if": lambda condition, yes, no: yes if condition else no,
        "createobject": lambda *pairs: dict(zip(pairs[::2], pairs[1::2], strict=True)),
        "union": union,
        "json": lambda s: json.loads(s),
    }


def arm(value: Any, parameters: Mapping[str, Any], variables: Mapping[str, Any]) -> Any:
    """A template value after deployment: `[expr]` strings evaluated (`[[` escapes), recursively."""
    if isinstance(value, dict):
        return {k: arm(v, parameters, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [arm(v, parameters, variables) for v in value]
    if isinstance(value, str) and value.startswith("[") and value.endswith("]") and not value.startswith("[["):
        return evaluate(value[1:-1], arm_functions(parameters, variables))
    return value
