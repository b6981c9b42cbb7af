"""The playground: a page at / and /playground that talks to /v1 from the browser, its files shipped in the package."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, abort, send_from_directory

FILES = Path(__file__).resolve().parent
ASSETS_PATH = "/playground/assets"
# Every file the page loads, with its type (stated here, not guessed from the host's mime.types; Flask adds utf-8).
ASSETS = {
    "playground.js": "text/javascript",
    "playground.css": "text/css",
}
# Endpoints that serve pages for people rather than the API (left out of the OpenAPI spec, like /docs).
ENDPOINTS = frozenset({"playground.page", "playground.asset"})

# Only this server's own files and API: no inline script or style, no other host, no framing, no forms
# posted anywhere, and no string ever turned into HTML by script (Trusted Types with no policy at all).
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

blp = Blueprint("playground", __name__)


@blp.after_request
def secure(response: Response) -> Response:
    """Send the page's security headers with every answer of this blueprint, its 404s included."""
    response.headers.update(HEADERS)
    return response


@blp.get("/")
@blp.get("/playground")
def page() -> Response:
    """The playground page (open: it holds no key; the visitor types one, kept in the tab's sessionStorage)."""
    return send_from_directory(FILES, "index.html", mimetype="text/html")


@blp.get(f"{ASSETS_PATH}/<name>")
def asset(name: str) -> Response:
    """One of the page's script and style files (revalidated on each load: a new version shows at once)."""
    if name not in ASSETS:
        abort(404)
    return send_from_directory(FILES, name, mimetype=ASSETS[name])
