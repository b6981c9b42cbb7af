"""before_request hooks of the API blueprints: the API key (x-api-key or Bearer, constant time) and JSON bodies."""

from __future__ import annotations

import hmac

from flask import current_app, request

from llmapi.errors import APIError

CHALLENGE = 'ApiKey realm="llmapi", header="x-api-key", Bearer realm="llmapi"'
EXTENSION = "llmapi.keys"


def _presented() -> bytes | None:
    """Return the key the client sent, as the bytes it sent, from x-api-key or Authorization: Bearer."""
    key = request.headers.get("x-api-key")
    if key is None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else None
    # Headers arrive decoded as latin-1; encoding back recovers the client's bytes exactly.
    return key.encode("latin-1", "replace") if key is not None else None


def is_valid(presented: bytes, keys: tuple[bytes, ...]) -> bool:
    """Compare against every configured key, so that timing reveals neither which nor how much matched."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    return matched


def require_api_key() -> None:
    """before_request hook: answer 401 unless the request carries a configured key."""
    if request.method == "OPTIONS":
        return
    require_key(current_app.extensions[EXTENSION])


def require_key(keys: tuple[bytes, ...]) -> None:
    """Answer 401 unless the request carries one of `keys` (routes with keys of their own use this too)."""
    presented = _presented()
    if not presented:
        raise APIError("Missing API key: send it in the x-api-key header.", status=401, headers=_challenge())
    if not is_valid(presented, keys):
        raise APIError("Invalid API key.", status=401, headers=_challenge())


def _challenge() -> dict[str, str]:
    """Tell the client how to authenticate."""
    return {"WWW-Authenticate": CHALLENGE}


def require_json() -> None:
    """before_request hook: bodies must be JSON."""
    if request.method in ("POST", "PUT", "PATCH") and not request.is_json:
        raise APIError("Content-Type must be application/json.", status=415)
