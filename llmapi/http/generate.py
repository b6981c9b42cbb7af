"""POST /generate: its request schema and examples, its output format, and the route (load, answer)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from flask import Response
from marshmallow import Schema, ValidationError, fields, validates_schema
from marshmallow.validate import Length, Range

from llmapi.config import Settings
from llmapi.engine.types import (
    ContextLengthExceeded,
    GenerationRequest,
    GenerationResult,
    Grammar,
    InvalidRequest,
    TokenLogprob,
)
from llmapi.errors import APIError, refusal, respond
from llmapi.http.answer import answer
from llmapi.http.fields import (
    MAX_REPETITION_PENALTY,
    MAX_SCHEMA_CHARS,
    MAX_SEED,
    MAX_STOP_SEQUENCES,
    MAX_TOP_K,
    ErrorSchema,
    PenaltiesSchema,
    StopField,
    StrictBoolean,
    StrictFloat,
    StrictInteger,
    Text,
    UsageSchema,
    schema_source,
)
from llmapi.http.hooks import require_api_key, require_json
from llmapi.http.jsonbody import Blueprint  # JSON bodies parsed with limits
from llmapi.http.sse import event_schema, sse
from llmapi.runtime.runner import Event

# transformers' generate takes any positive temperature; this API follows it up to a bound where sampling is
# already uniform (OpenAI's /v1 stops at 2, its own documented range: see http/openai/schemas.py).
MAX_TEMPERATURE = 100.0
MAX_TOP_N_TOKENS = 5  # alternatives per position in details, as TGI allows
VALIDATION_STATUS = 422  # this API's answer to a body its schema refuses (/v1 answers 400, as OpenAI does)
SAMPLING_KEYS = ("temperature", "top_p", "top_k")
PROMPT = "Artificial Intelligence is"  # the README's curl example
RETRY_AFTER = {"Retry-After": {"description": "seconds before a retry may succeed", "schema": {"type": "integer"}}}
SSE_SCHEMA = event_schema('JSON: `{"token": {"text": ...}}` per piece, then the full answer (or an error object)')


class TokenSchema(Schema):
    """One token of `details`: its id, text and log-probability (the model's raw log-softmax)."""

    id = fields.Integer(required=True)
    text = fields.String(required=True)
    logprob = fields.Float(allow_none=True, metadata={"description": "null for the prompt's first token"})
    special = fields.Boolean(required=True)


class DetailsSchema(Schema):
    """TGI-like details of a generation: every token and its log-probability, before temperature and penalties."""

    finish_reason = fields.String(required=True)
    generated_tokens = fields.Integer(required=True)
    seed = fields.Integer(allow_none=True)
    prefill = fields.List(fields.Nested(TokenSchema), metadata={"description": "with decoder_input_details"})
    tokens = fields.List(fields.Nested(TokenSchema), required=True)
    top_tokens = fields.List(
        fields.List(fields.Nested(TokenSchema)), metadata={"description": "with top_n_tokens: per position"}
    )


class GenerateResponseSchema(Schema):
    """The answer to POST /generate."""

    generated_text = fields.String(
        required=True, metadata={"description": "prompt + continuation, or the continuation alone"}
    )
    finish_reason = fields.String(
        required=True, metadata={"description": "length, eos, stop or timeout", "example": "length"}
    )
    stop_sequence = fields.String(allow_none=True, metadata={"description": "the stop sequence that matched"})
    usage = fields.Nested(UsageSchema, required=True)
    model = fields.String(required=True)
    seed = fields.Integer(allow_none=True, metadata={"description": "the seed used; send it back to reproduce"})
    details = fields.Nested(DetailsSchema, metadata={"description": "with details: true"})


def request_schema(settings: Settings) -> type[Schema]:
    """Make the /generate body's schema with the limits in `settings` baked in (so the OpenAPI spec shows them)."""

    class GenerateRequestSchema(PenaltiesSchema):
        """The body of POST /generate."""

        prompt = Text(
            required=True, validate=Length(min=1, max=settings.max_prompt_chars), metadata={"example": PROMPT}
        )
        max_new_tokens = StrictInteger(
            load_default=settings.max_new_tokens_default,
            validate=Range(min=1, max=settings.max_new_tokens_limit),
            metadata={"example": 40},
        )
        min_new_tokens = StrictInteger(
            load_default=0,
            validate=Range(min=0, max=settings.max_new_tokens_limit),
            metadata={"description": "end-of-sequence is suppressed until this many; must not exceed max_new_tokens"},
        )
        do_sample = StrictBoolean(
            metadata={"description": "sample instead of greedy; implied by temperature, top_p or top_k"}
        )
        temperature = StrictFloat(validate=Range(min=0, max=MAX_TEMPERATURE), metadata={"description": "0 = greedy"})
        top_p = StrictFloat(validate=Range(min=0, max=1, min_inclusive=False))
        top_k = StrictInteger(validate=Range(min=0, max=MAX_TOP_K), metadata={"description": "0 = no top-k"})
        repetition_penalty = StrictFloat(
            load_default=1.0, validate=Range(min=0, max=MAX_REPETITION_PENALTY, min_inclusive=False)
        )
        seed = StrictInteger(validate=Range(min=0, max=MAX_SEED), metadata={"description": "fixes the sampling"})
        stop = StopField(metadata={"description": f"up to {MAX_STOP_SEQUENCES} sequences that end generation"})
        return_full_text = StrictBoolean(load_default=True, metadata={"description": "prepend the prompt"})
        timeout_ms = StrictInteger(
            load_default=settings.timeout_default_ms,
            validate=Range(min=1, max=settings.timeout_max_ms),
            metadata={"description": "deadline; on expiry the text so far is returned with finish_reason timeout"},
        )
        stream = StrictBoolean(load_default=False, metadata={"description": "answer with Server-Sent Events"})
        min_p = StrictFloat(
            load_default=0.0,
            validate=Range(min=0, max=1),
            metadata={"description": "sampling drops tokens less than min_p times as likely as the most likely"},
        )
        details = StrictBoolean(
            load_default=False,
            metadata={"description": "add `details`: each generated token's id, text and log-probability (raw)"},
        )
        top_n_tokens = StrictInteger(
            load_default=0,
            validate=Range(min=0, max=MAX_TOP_N_TOKENS),
            metadata={"description": "with details: this many most likely alternatives per position"},
        )
        decoder_input_details = StrictBoolean(
            load_default=False, metadata={"description": "with details: score the prompt's tokens too (`prefill`)"}
        )
        json_schema = fields.Dict(
            metadata={
                "description": f"constrain the output to JSON valid under this schema (at most {MAX_SCHEMA_CHARS}"
                " characters)"
            }
        )

        @validates_schema
        def _min_below_max(self, data: dict[str, Any], **kwargs: Any) -> None:
            if data.get("min_new_tokens", 0) > data.get("max_new_tokens", 0):
                raise ValidationError("must not exceed max_new_tokens.", "min_new_tokens")

        @validates_schema
        def _one_constraint(self, data: dict[str, Any], **kwargs: Any) -> None:
            if "json_schema" in data:
                schema_source(data["json_schema"])  # refuses an over-long one, naming json_schema
            if (data.get("top_n_tokens") or data.get("decoder_input_details")) and not data.get("details"):
                raise ValidationError("needs details: true.", "top_n_tokens")

    return GenerateRequestSchema


def grammar_of(args: dict[str, Any]) -> Grammar | None:
    """The constraint a /generate body asks for, if any."""
    if "json_schema" in args:
        return Grammar("json_schema", schema_source(args["json_schema"]))
    return None


def to_generation_request(args: dict[str, Any]) -> GenerationRequest:
    """Resolve a validated /generate body into an engine request."""
    do_sample = args.get("do_sample")
    if do_sample is None:
        do_sample = any(key in args for key in SAMPLING_KEYS)
    details = args["details"]
    return GenerationRequest(
        prompt=args["prompt"],
        max_new_tokens=args["max_new_tokens"],
        min_new_tokens=args["min_new_tokens"],
        do_sample=do_sample,
        temperature=args.get("temperature", 1.0),
        top_p=args.get("top_p", 1.0),
        top_k=args.get("top_k", 0),
        repetition_penalty=args["repetition_penalty"],
        seed=args.get("seed"),
        stop=args.get("stop", ()),
        timeout_s=args["timeout_ms"] / 1000.0,
        stream=args["stream"],
        frequency_penalty=args["frequency_penalty"],
        presence_penalty=args["presence_penalty"],
        logit_bias=args.get("logit_bias", ()),
        min_p=args["min_p"],
        logprobs=args["top_n_tokens"] if details else None,
        prompt_logprobs=args["top_n_tokens"] if details and args["decoder_input_details"] else None,
        grammar=grammar_of(args),
    )


def token_body(entry: TokenLogprob) -> dict[str, Any]:
    """One token of `details`."""
    return {"id": entry.id, "text": entry.text, "logprob": entry.logprob, "special": False}


def details_body(result: GenerationResult, args: dict[str, Any]) -> dict[str, Any]:
    """TGI's `details`: the generated tokens (and alternatives, and the prompt's, when asked)."""
    tokens = result.logprobs or ()
    body: dict[str, Any] = {
        "finish_reason": result.finish_reason,
        "generated_tokens": result.completion_tokens,
        "seed": result.seed,
        "tokens": [token_body(entry) for entry in tokens],
    }
    if args["decoder_input_details"]:
        body["prefill"] = [token_body(entry) for entry in result.prompt_logprobs or ()]
    if args["top_n_tokens"]:
        body["top_tokens"] = [[token_body(alt) for alt in entry.top] for entry in tokens]
    return body


def generate_body(result: GenerationResult, args: dict[str, Any]) -> dict[str, Any]:
    """Build the /generate answer from a result."""
    text = args["prompt"] + result.text if args["return_full_text"] else result.text
    return {
        "generated_text": text,
        "finish_reason": result.finish_reason,
        "stop_sequence": result.stop_sequence,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.total_tokens,
        },
        "model": result.model,
        "seed": result.seed,
        **({"details": details_body(result, args)} if args["details"] else {}),
    }


class GenerateFormat:
    """How /generate writes its one result: a body, or a token event per piece and then the body."""

    done = None  # the last event is the full answer; nothing follows it
    _response = GenerateResponseSchema()

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args

    def body(self, results: Sequence[GenerationResult]) -> dict[str, Any]:
        """The answer of the request's one generation."""
        return generate_body(results[0], self.args)

    def events(self, events: Iterator[Event]) -> Iterator[dict[str, Any]]:
        """A `{"token": {"text": ...}}` event per piece, then the full answer."""
        for _, item in events:
            if isinstance(item, GenerationResult):
                yield self._response.dump(self.body([item]))
            elif self.args["details"]:
                yield {"token": {"text": item.text}, "tokens": [token_body(entry) for entry in item.logprobs]}
            else:
                yield {"token": {"text": item.text}}


def context_too_long(exc: ContextLengthExceeded) -> Response:
    """This API's answer to a prompt plus max_new_tokens that do not fit the model."""
    return respond(APIError(str(exc), status=422, param="max_new_tokens"))


def request_examples(settings: Settings) -> dict[str, dict[str, Any]]:
    """Named POST /generate bodies; the first, the README's curl example, is what Try it out starts with."""
    tokens = min(40, settings.max_new_tokens_limit)
    bodies = {
        "readme": ("The README's curl example", {"prompt": PROMPT, "max_new_tokens": tokens}),
        "sampled": (
            "Sampled and reproducible (send the same seed again)",
            {"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0.8, "top_p": 0.95, "seed": 42},
        ),
        "stop": (
            "Stop at a sequence",
            {"prompt": "Q: What is AI?\nA:", "max_new_tokens": tokens, "stop": ["\n", "Q:"]},
        ),
        "stream": ("Streamed as Server-Sent Events", {"prompt": PROMPT, "max_new_tokens": tokens, "stream": True}),
    }
    return {name: {"summary": summary, "value": value} for name, (summary, value) in bodies.items()}


def response_example() -> dict[str, Any]:
    """A POST /generate answer."""
    return {
        "generated_text": PROMPT + " a field of computer science that",
        "finish_reason": "length",
        "stop_sequence": None,
        "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
        "model": "models/tiny-gpt2",
        "seed": None,
    }


def stream_example() -> str:
    """A streamed POST /generate answer: a token event per piece, then the full answer."""
    pieces = [" a", " field", " of", " computer", " science", " that"]
    return "".join(sse(event) for event in [{"token": {"text": piece}} for piece in pieces] + [response_example()])


def create_blueprint(settings: Settings) -> Blueprint:
    """Build the /generate blueprint with the request limits of `settings`."""
    blp = Blueprint("generation", __name__, description="Text generation with the served model.")
    blp.before_request(require_api_key)
    blp.before_request(require_json)
    blp.register_error_handler(ContextLengthExceeded, context_too_long)
    blp.register_error_handler(InvalidRequest, refusal(VALIDATION_STATUS))

    @blp.route("/generate", methods=["POST"])
    # An instance, not the class: webargs would otherwise build (and deep-copy the fields of) one per request.
    @blp.arguments(request_schema(settings)(), error_status_code=VALIDATION_STATUS, examples=request_examples(settings))
    @blp.response(200, GenerateResponseSchema, example=response_example())
    @blp.alt_response(200, schema=SSE_SCHEMA, content_type="text/event-stream", example=stream_example())
    @blp.alt_response(422, schema=ErrorSchema, description="Invalid parameters or too long for the context")
    @blp.alt_response(503, schema=ErrorSchema, description="Model unavailable", headers=RETRY_AFTER)
    def generate(args: dict[str, Any]) -> Any:
        """Generate a continuation of the prompt.

        With `"stream": true` the answer is `text/event-stream`: one `{"token": {"text": ...}}` event per
        piece of text, then one event with the full answer (the 200 body below).
        """
        return answer([to_generation_request(args)], GenerateFormat(args), stream=args["stream"])

    return blp
