"""JSON bodies that cannot hurt: a depth limit and a digit limit, checked while parsing, before any schema.

Python's json module has neither. A body of 50,000 nested brackets makes its C scanner raise RecursionError,
and an integer of more than 4,300 digits makes int() raise ValueError (CPython's guard against its quadratic
int-from-text conversion): webargs, which parses bodies with json.loads, turns only JSONDecodeError into a
400, so both came out as 500s. Here numbers are checked as text before conversion (json's parse_int and
parse_float hooks), depth is checked on the parsed value, and either limit answers 400 in the one error shape.
A number is refused whatever field it sits in, so the answer is the parser's 400 on every route (/generate
included, whose field errors are 422s): it is a malformed body, not a value out of a field's range; its param
still names the field.
"""

from __future__ import annotations

import json
from typing import Any

import flask_smorest
from flask import Flask, Request
from flask.json.provider import DefaultJSONProvider
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request

from llmapi.errors import APIError
from llmapi.http.fields import MAX_JSON_DEPTH, MAX_NUMBER_DIGITS

NON_DIGITS = "+-.eE"  # what a JSON number holds besides digits


class _LongNumber(Exception):
    """Raised by the number hooks, so that json.loads stops at the first number over the limit."""


class _Marker:
    """Stands for a number over the limit when looking for the field that holds it."""


def _digits(text: str) -> int:
    """Count the digits of a JSON number's text."""
    return len(text) - sum(text.count(char) for char in NON_DIGITS)


def _int(text: str) -> int:
    """json's parse_int: convert, unless the number has too many digits."""
    if len(text) > MAX_NUMBER_DIGITS and _digits(text) > MAX_NUMBER_DIGITS:
        raise _LongNumber
    return int(text)


def _float(text: str) -> float:
    """json's parse_float: convert, unless the number has too many digits."""
    if len(text) > MAX_NUMBER_DIGITS and _digits(text) > MAX_NUMBER_DIGITS:
        raise _LongNumber
    return float(text)


def _mark(text: str) -> Any:
    """A parse hook that replaces numbers over the limit with a marker (only to find where they are)."""
    return _Marker() if _digits(text) > MAX_NUMBER_DIGITS else 0


def loads(data: bytes | str) -> Any:
    """Parse a JSON body; answer 400 if it nests deeper than MAX_JSON_DEPTH or has a number too long.

    Invalid JSON and undecodable bytes raise json's and codecs' own errors, which webargs answers as before.
    """
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float)
    except _LongNumber:
        raise number_error(_long_number_at(text)) from None
    except RecursionError:  # deeper than the interpreter's recursion limit (about 1,000), far past ours
        raise depth_error() from None
    if _depth_exceeded(value):
        raise depth_error()
    return value


def number_error(path: str | None) -> APIError:
    """The answer to a number with too many digits, naming the field that holds it when it is known."""
    where = f"{path}: " if path else ""
    return APIError(f"{where}a number in the body has more than {MAX_NUMBER_DIGITS} digits.", status=400, param=path)


def depth_error() -> APIError:
    """The answer to a body nested too deep."""
    return APIError(f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.", status=400)


def _children(value: Any) -> list[tuple[str, Any]]:
    """The (key, value) pairs of a JSON container; none for anything else."""
    if isinstance(value, dict):
        return [(str(key), item) for key, item in value.items()]
    if isinstance(value, list):
        return [(str(index), item) for index, item in enumerate(value)]
    return []


def _depth_exceeded(value: Any) -> bool:
    """Whether a container sits inside MAX_JSON_DEPTH others (without recursion: the depth is the input's)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        for child in item.values() if isinstance(item, dict) else item if isinstance(item, list) else ():
            if isinstance(child, (dict, list)):
                if depth >= MAX_JSON_DEPTH:
                    return True
                stack.append((child, depth + 1))
    return False


def _long_number_at(text: str) -> str | None:
    """The path (`field.0.key`) of the first number over the limit, to name it in the answer; on the error path only."""
    try:
        value = json.loads(text, parse_int=_mark, parse_float=_mark)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, _Marker):
            return path or None
        for key, child in reversed(_children(item)):
            stack.append((child, f"{path}.{key}" if path else key))
    return None


class JSONParser(FlaskParser):
    """webargs' Flask parser, reading bodies with loads() (webargs' own calls json.loads, which has no limits)."""

    def _raw_load_json(self, req: Request) -> Any:
        """Return the request's JSON body, or `missing` when it is not JSON (as FlaskParser does)."""
        if not is_json_request(req):
            return core.missing
        return loads(req.get_data(cache=True))


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint, whose @arguments parse JSON bodies with the limits of this module."""

    ARGUMENTS_PARSER = JSONParser()


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON provider, with the same limits for request.get_json()."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        """Parse with loads() (with json.loads when a caller passes options of its own)."""
        return loads(s) if not kwargs else super().loads(s, **kwargs)


def init_app(app: Flask) -> None:
    """Make `app` parse JSON with these limits wherever Flask does."""
    app.json = JSONProvider(app)
