"""schemathesis hooks (SCHEMATHESIS_HOOKS): the one request rule that JSON Schema cannot state."""

from __future__ import annotations

import schemathesis

from tests.schemathesis_openai_hooks import positive_body  # importing it registers the /v1 routes' rules


@schemathesis.hook
def filter_case(context: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    """Drop positive cases whose min_new_tokens exceeds max_new_tokens: the spec says they are invalid in words."""
    body = positive_body(case)
    if body is None:
        return True
    low, high = body.get("min_new_tokens"), body.get("max_new_tokens")
    return not (type(low) is int and type(high) is int and low > high)
