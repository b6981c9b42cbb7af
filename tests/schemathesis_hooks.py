"""schemathesis hooks (SCHEMATHESIS_HOOKS): the request rules of /generate that JSON Schema cannot state."""

from __future__ import annotations

import schemathesis

from tests.schemathesis_openai_hooks import in_vocabulary, positive_body  # importing it registers /v1's rules


@schemathesis.hook
def filter_case(context: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    """Drop positive cases whose min_new_tokens exceeds max_new_tokens: the spec says they are invalid in words."""
    body = positive_body(case)
    if body is None:
        return True
    low, high = body.get("min_new_tokens"), body.get("max_new_tokens")
    if type(low) is int and type(high) is int and low > high:
        return False
    # A fuzzed grammar or schema is mostly one no compiler takes (a 422 the spec can state only in words).
    if body.get("json_schema"):
        return False
    if (body.get("top_n_tokens") or body.get("decoder_input_details")) and not body.get("details"):
        return False
    return in_vocabulary(body.get("logit_bias"))
