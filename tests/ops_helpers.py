"""Helpers of the operations tests: reading Prometheus text and checking error bodies."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def sample(text: str, name: str, **labels: str) -> float:
    """Sum the samples called `name` whose labels include `labels` (0 when there are none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def error_of(body: Any, status: int) -> dict[str, Any]:
    """Check the one error shape of a decoded body and return its inside."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    return error
