"""What the HTTP side costs per request, in one process with an engine that answers at once (no model work).

`python -m bench.http_cost` prints CPU microseconds per /generate request through the whole Flask app (auth, JSON,
webargs + marshmallow validation, the view, the response schema, JSON out), the same for /v1/completions and
/v1/chat/completions, the /generate parts measured apart, and the tokenizer's encode and decode beside them.
gunicorn's own HTTP parsing and socket work come on top (the server table's CPU figures include them).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, ClassVar

from llmapi.engine.types import GenerationRequest, GenerationResult

BODY = {"prompt": "Artificial Intelligence is", "max_new_tokens": 32, "min_new_tokens": 32, "temperature": 0.8}
KEY = "bench-key"


class InstantHandle:
    """A generation that is already over."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request

    def pieces(self) -> Any:
        """Yield the result only."""
        yield self.result()

    def result(self) -> GenerationResult:
        """A fixed result of max_new_tokens tokens."""
        return GenerationResult(" tok" * self.request.max_new_tokens, "length", 4, self.request.max_new_tokens, "m")

    def cancel(self) -> None:
        """Nothing to cancel."""


class InstantEngine:
    """An engine that answers every request at once."""

    model_name = "instant"
    placement: ClassVar[dict[str, str]] = {}
    on_stats: ClassVar[Any] = None

    def stats(self) -> dict[str, Any]:
        """No live figures."""
        return {}

    def submit(self, request: GenerationRequest) -> InstantHandle:
        """Answer at once."""
        return InstantHandle(request)

    def render_chat(self, messages: Any) -> str:
        """Join the contents."""
        return "\n".join(m["content"] for m in messages)


def cpu_us(func: Callable[[], Any], count: int) -> float:
    """CPU microseconds per call of `func`, after a warm-up."""
    for _ in range(min(50, count)):
        func()
    started = time.process_time()
    for _ in range(count):
        func()
    return (time.process_time() - started) / count * 1e6


def wsgi_call(app: Any, body: bytes, path: str = "/generate") -> Callable[[], Any]:
    """A call of the WSGI app on a ready-made POST environ, as gunicorn makes one."""
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        statuses.append(status)

    def call() -> None:
        environ = {
            "REQUEST_METHOD": "POST", "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
            "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)), "HTTP_X_API_KEY": KEY,
            "wsgi.input": io.BytesIO(body), "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO(),
            "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.version": (1, 0),
        }  # fmt: skip
        b"".join(app(environ, start_response))
        assert statuses.pop() == "200 OK"

    return call


def measure(model: str | None, count: int) -> dict[str, float]:
    """Microseconds per request for the whole app and for its parts."""
    from llmapi import create_app
    from llmapi.http.generate import GenerateResponseSchema, generate_body, request_schema, to_generation_request

    app = create_app({"api_key": KEY}, engine_factory=lambda settings: InstantEngine())
    quiet = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    for handler in logging.getLogger("llmapi").handlers:  # each request's log line is formatted, then dropped
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(quiet)
    body = json.dumps(BODY).encode()
    schema_class = request_schema(app.config["LLMAPI_SETTINGS"])
    schema = schema_class()
    args = schema.load(json.loads(body))
    result = InstantHandle(to_generation_request(args)).result()
    completion = {"prompt": BODY["prompt"], "max_tokens": 32, "temperature": 0.8}
    chat = {"messages": [{"role": "user", "content": BODY["prompt"]}], "max_tokens": 32, "temperature": 0.8}
    figures = {
        "whole app (WSGI call)": cpu_us(wsgi_call(app, body), count),
        "whole app, /v1/completions": cpu_us(wsgi_call(app, json.dumps(completion).encode(), "/v1/completions"), count),
        "whole app, /v1/chat/completions": cpu_us(
            wsgi_call(app, json.dumps(chat).encode(), "/v1/chat/completions"), count
        ),
        "json.loads of the body": cpu_us(lambda: json.loads(body), count),
        "schema load (validation)": cpu_us(lambda: schema.load(json.loads(body)), count),
        "schema instantiation (no longer per request)": cpu_us(schema_class, count),
        "response dump + json.dumps": cpu_us(
            lambda: json.dumps(GenerateResponseSchema().dump(generate_body(result, args))), count
        ),
    }
    if model:
        from llmapi.engine.bytelevel import fast_decoder
        from llmapi.engine.loader import load

        tokenizer = load(model).tokenizer
        ids = tokenizer.encode(BODY["prompt"])

        def decode(token_ids: Any) -> str:
            return tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        fast = fast_decoder(tokenizer, decode)
        long_prompt = "Artificial Intelligence is the study of machines that learn. " * 16
        figures["tokenizer encode, benchmark prompt"] = cpu_us(lambda: tokenizer.encode(BODY["prompt"]), count)
        figures["tokenizer encode, 1,000 characters"] = cpu_us(lambda: tokenizer.encode(long_prompt), count)
        figures["tokenizer decode, 3 tokens"] = cpu_us(lambda: decode(ids[:3]), count)
        figures["byte-table decode, 3 tokens"] = cpu_us(lambda: fast(ids[:3]), count)
    return figures


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m bench.http_cost [--model DIR] [--count N]; JSON on the last line."""
    parser = argparse.ArgumentParser(prog="python -m bench.http_cost", description=__doc__)
    parser.add_argument("--model", help="model directory whose tokenizer to time")
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args(argv)
    figures = measure(args.model, args.count)
    for name, value in figures.items():
        print(f"{value:9.1f} us  {name}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
