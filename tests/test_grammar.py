"""Structured output in the batching engine: xgrammar's token masks, per row, on the offline tiny model."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from bench.grammar import SCHEMA
from llmapi.engine import GenerationRequest
from llmapi.engine.types import Grammar, InvalidRequest
from tests.conftest import run_concurrently

SCHEMA_GRAMMAR = Grammar("json_schema", json.dumps(SCHEMA, sort_keys=True, separators=(",", ":")))


def test_grammar_50_sampled_answers_validate_and_most_finish_within_120_tokens(engine):
    request = GenerationRequest(
        prompt="Pet:", max_new_tokens=120, do_sample=True, temperature=1.0, grammar=SCHEMA_GRAMMAR
    )
    results = [handle.result() for handle in [engine.submit(request) for _ in range(50)]]
    finished = [result for result in results if result.finish_reason != "length"]
    for result in finished:
        jsonschema.validate(json.loads(result.text), SCHEMA)
        assert "\n" not in result.text and "  " not in result.text  # compact: no room to pad
    assert len(finished) >= 45


def test_grammar_rows_share_a_batch_with_plain_rows(engine):
    plain = GenerationRequest(prompt="Hello there", max_new_tokens=12)
    alone = engine.generate(plain).text
    requests = [plain, GenerationRequest(prompt="Pet:", max_new_tokens=120, grammar=SCHEMA_GRAMMAR)] * 2
    results = run_concurrently(lambda i: engine.generate(requests[i]), len(requests))
    assert results[0].text == results[2].text == alone  # untouched by its neighbours' masks
    for result in results[1::2]:
        jsonschema.validate(json.loads(result.text), SCHEMA)
    assert max(result.timings["batch_size"] for result in results) > 1


def test_grammar_cut_by_max_new_tokens_says_length(engine):
    result = engine.generate(GenerationRequest(prompt="Pet:", max_new_tokens=5, grammar=SCHEMA_GRAMMAR))
    assert result.finish_reason == "length" and result.completion_tokens == 5
    assert result.text.startswith('{"')


def test_grammar_json_object_is_an_object(engine):
    result = engine.generate(
        GenerationRequest(prompt="x", max_new_tokens=120, do_sample=True, seed=3, grammar=Grammar("json_object"))
    )
    if result.finish_reason != "length":
        assert isinstance(json.loads(result.text), dict)
    assert result.text.startswith("{")


def test_grammar_compiled_once_per_schema(engine):
    grammars = engine.grammars()
    first = grammars.compiled(SCHEMA_GRAMMAR)
    assert grammars.compiled(Grammar("json_schema", SCHEMA_GRAMMAR.source)) is first


@pytest.mark.parametrize("schema", ['{"type": 5}', '{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}'])
def test_grammar_invalid_schema_is_refused_naming_its_field(engine, schema):
    with pytest.raises(InvalidRequest) as info:
        engine.submit(GenerationRequest(prompt="x", max_new_tokens=4, grammar=Grammar("json_schema", schema)))
    assert info.value.param == "json_schema"
    assert ".cc:" not in str(info.value) and not re.search(r"\[[0-9:]+\]", str(info.value))  # no library internals
