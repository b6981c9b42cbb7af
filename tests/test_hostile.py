"""Hostile JSON bodies on every POST route, in-process: too deep, too wide, numbers too long; a 400, never a 500."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmapi.http.fields import MAX_JSON_DEPTH, MAX_NUMBER_DIGITS
from llmapi.http.jsonbody import loads
from tests.ops_helpers import error_of

# A valid body of each POST route, and the field that counts its new tokens.
BODIES: dict[str, dict[str, Any]] = {
    "/generate": {"prompt": "Hello there", "max_new_tokens": 2},
    "/v1/completions": {"prompt": "Hello there", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2},
}
TOKENS = {"/generate": "max_new_tokens", "/v1/completions": "max_tokens", "/v1/chat/completions": "max_tokens"}
FIELD_STATUS = {"/generate": 422, "/v1/completions": 400, "/v1/chat/completions": 400}  # a field's error
ROUTES = list(BODIES)


def post(client: Any, auth: dict[str, str], path: str, text: str) -> Any:
    """POST `text` as a JSON body."""
    return client.post(path, data=text, headers={**auth, "Content-Type": "application/json"})


def nested(depth: int, leaf: str = '"x"') -> str:
    """`leaf` inside `depth` arrays, written out (json.dumps itself would recurse too deep)."""
    return "[" * depth + leaf + "]" * depth


def with_field(path: str, field: str, value_text: str) -> str:
    """The valid body of `path` with `field` set to the JSON text `value_text`."""
    body = {key: value for key, value in BODIES[path].items() if key != field}
    return json.dumps(body)[:-1] + f', "{field}": {value_text}}}'


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 1_000, 50_000])
def test_deep_json_is_refused_with_400_naming_the_limit(client, auth, path, depth):
    # The body nests depth + 1 levels: the field's arrays inside the body's object.
    response = post(client, auth, path, with_field(path, "stop", nested(depth)))
    error = error_of(response.get_json(), 400)
    assert f"nested deeper than {MAX_JSON_DEPTH} levels" in error["message"]


@pytest.mark.parametrize("path", ROUTES)
def test_a_body_that_is_only_brackets_is_refused_with_400(client, auth, path):
    response = post(client, auth, path, "[" * 50_000 + "]" * 50_000)
    assert f"nested deeper than {MAX_JSON_DEPTH}" in error_of(response.get_json(), 400)["message"]


@pytest.mark.parametrize("path", ROUTES)
def test_json_at_the_depth_limit_reaches_the_schema(client, auth, path):
    response = post(client, auth, path, with_field(path, "stop", nested(MAX_JSON_DEPTH - 1)))
    error = error_of(response.get_json(), FIELD_STATUS[path])
    assert error["param"] == "stop" and "nested" not in error["message"]


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("digits", [MAX_NUMBER_DIGITS + 1, 5_000, 200_000])
def test_a_huge_integer_is_refused_with_400_naming_the_field(client, auth, path, digits):
    response = post(client, auth, path, with_field(path, TOKENS[path], "9" * digits))
    error = error_of(response.get_json(), 400)
    assert error["param"] == TOKENS[path]
    assert f"more than {MAX_NUMBER_DIGITS} digits" in error["message"]


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("number", ["-" + "1" * 5_000, "0." + "1" * 5_000, "1" * 300 + "e5", "1e" + "9" * 200])
def test_long_negative_decimal_and_exponent_numbers_are_refused(client, auth, path, number):
    response = post(client, auth, path, with_field(path, "seed", number))
    assert error_of(response.get_json(), 400)["param"] == "seed"


def test_a_long_number_deep_in_the_body_is_named_by_its_path(client, auth):
    text = json.dumps({"messages": [{"role": "user", "content": "X"}], "max_tokens": 2}).replace('"X"', "1" * 5_000)
    error = error_of(post(client, auth, "/v1/chat/completions", text).get_json(), 400)
    assert error["param"] == "messages.0.content"


@pytest.mark.parametrize("path", ROUTES)
def test_a_number_at_the_digit_limit_reaches_the_schema(client, auth, path):
    response = post(client, auth, path, with_field(path, TOKENS[path], "9" * MAX_NUMBER_DIGITS))
    error = error_of(response.get_json(), FIELD_STATUS[path])
    assert error["param"] == TOKENS[path] and "digits" not in error["message"]


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("field", ["prompt", "stop", "messages", "unknown"])
def test_wide_json_is_answered_without_a_500(client, auth, path, field):
    wide = "[" + ",".join(['{"a": [1, 2.5, "x", null]}'] * 5_000) + "]"
    response = post(client, auth, path, with_field(path, field, wide))
    assert response.status_code in (400, 422)
    error_of(response.get_json(), response.status_code)


def test_invalid_json_still_gets_the_usual_400(client, auth):
    error = error_of(post(client, auth, "/generate", '{"prompt": ').get_json(), 400)
    assert error["message"] == "Request body is not valid JSON."


def test_loads_counts_depth_as_nesting_and_digits_as_digits():
    assert loads(nested(MAX_JSON_DEPTH - 1, "1")) is not None
    assert loads("-" + "1" * MAX_NUMBER_DIGITS) < 0  # the sign is not a digit
    assert loads("1." + "5" * (MAX_NUMBER_DIGITS - 1)) > 1
    assert loads(json.dumps({"a": [{"b": [[1]]}] * 1_000})) is not None


# Hypothesis: bodies of any shape, as deep and wide as a body may be, where a route looks for its fields.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**120), max_value=10**120),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
shallow = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6)
).map(json.dumps)


@st.composite
def json_texts(draw: st.DrawFn) -> str:
    """The text of a JSON value: shallow, nested up to thousands of levels, or thousands wide."""
    value = draw(shallow)
    shape = draw(st.sampled_from(["shallow", "deep", "wide", "deep and wide"]))
    if shape in ("wide", "deep and wide"):
        value = "[" + ",".join([value] * draw(st.integers(0, 5_000))) + "]"
    if shape in ("deep", "deep and wide"):
        depth = draw(st.integers(0, 3_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"k": ', "}"), ('[{"k": ', "}]")]))
        value = opener * depth + value + closer * depth
    return value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(ROUTES),
    field=st.sampled_from(["prompt", "messages", "max_new_tokens", "max_tokens", "stop", "seed", "n", None]),
    value=json_texts(),
)
def test_no_body_of_any_depth_or_width_gets_a_500(client, auth, path, field, value):
    text = value if field is None else with_field(path, field, value)
    response = post(client, auth, path, text)
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code >= 400:
        error_of(response.get_json(), response.status_code)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(ROUTES), text=st.text(alphabet='[]{}",:0123456789-+.eE nulltrfas\\', max_size=400))
def test_no_json_like_text_gets_a_500(client, auth, path, text):
    response = post(client, auth, path, text)
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code >= 400:
        error_of(response.get_json(), response.status_code)
