"""Chat messages as current clients send them: system or developer, user, assistant (with tool_calls), tool."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validates_schema
from marshmallow.validate import Length, OneOf

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_ID = 256  # a tool call's id, as clients echo it back
MAX_NAME = 64


class FunctionCallInSchema(Schema):
    """The function of a call the assistant made earlier in the conversation."""

    name = fields.String(required=True, validate=Length(min=1, max=MAX_NAME))
    arguments = fields.String(required=True, metadata={"description": "JSON text, as the call was answered"})


class ToolCallInSchema(Schema):
    """A call the assistant made earlier in the conversation, as the answer gave it."""

    id = fields.String(required=True, validate=Length(min=1, max=MAX_ID))
    type = fields.String(required=True, validate=OneOf(["function"]))
    function = fields.Nested(FunctionCallInSchema, required=True)


def message_schema(content_field: fields.Field) -> type[Schema]:
    """The schema of one chat message, its text read by `content_field` (a field with the app's limits)."""

    class ChatMessageSchema(Schema):
        """One chat message: `developer` is the system message under its newer name."""

        role = fields.String(required=True, validate=OneOf(ROLES, error=f"Must be one of: {', '.join(ROLES)}."))
        content = content_field
        name = fields.String(validate=Length(max=MAX_NAME), metadata={"description": "accepted, not used"})
        tool_calls = fields.List(
            fields.Nested(ToolCallInSchema),
            validate=Length(max=128),
            metadata={"description": "an assistant's calls (its content may then be null)"},
        )
        tool_call_id = fields.String(
            validate=Length(min=1, max=MAX_ID), metadata={"description": "a tool message: the call it answers"}
        )

        @validates_schema
        def _fields_fit_the_role(self, data: dict[str, Any], **kwargs: Any) -> None:
            role = data.get("role")
            if data.get("content") is None and not (role == "assistant" and data.get("tool_calls")):
                raise ValidationError("Missing data for required field.", "content")
            if role == "tool" and "tool_call_id" not in data:
                raise ValidationError("A tool message needs the id of the call it answers.", "tool_call_id")
            if role != "tool" and "tool_call_id" in data:
                raise ValidationError("Only a tool message has a tool_call_id.", "tool_call_id")
            if role != "assistant" and "tool_calls" in data:
                raise ValidationError("Only an assistant message has tool_calls.", "tool_calls")

        @post_load
        def _plain(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            if data.get("content") is None:
                data["content"] = ""
            return data

    return ChatMessageSchema


def chat_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as the engine renders them: developer as system; calls and call ids kept, names dropped."""
    out = []
    for message in messages:
        role = "system" if message["role"] == "developer" else message["role"]
        rendered: dict[str, Any] = {"role": role, "content": message["content"]}
        for key in ("tool_calls", "tool_call_id"):
            if key in message:
                rendered[key] = message[key]
        out.append(rendered)
    return out
