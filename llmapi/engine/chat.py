"""Chat messages to one prompt: the tokenizer's chat template, or a documented default when it has none."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError

from llmapi.engine.toolcalls import generic_messages, template_messages
from llmapi.engine.types import EngineError

ROLES = ("system", "user", "assistant")
Message = Mapping[str, Any]  # role, content, and an assistant's tool_calls or a tool's tool_call_id


class ChatTemplateError(EngineError):
    """The model's chat template refused the conversation (for example, roles out of the order it wants)."""


def default_template(messages: Sequence[Message]) -> str:
    """Render one `Role: content` line per message, then `Assistant:` for the model to continue.

    Used for models without a chat template (GPT-2 has none). A base model may go on to write the
    next `User:` turn itself; a client that wants one reply sends `stop: ["\\nUser:"]`.
    """
    lines = [f"{message['role'].capitalize()}: {message['content']}" for message in messages]
    return "\n".join([*lines, "Assistant:"])


def takes_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders `tools` itself (it names them); else the generic prompt does."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def render(tokenizer: Any, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Render `messages` (and `tools`, OpenAI's tool objects) with the tokenizer's chat template, or the default one.

    A template that takes tools gets them and the conversation's calls as they are; any other gets the generic
    tool prompt and the calls as text (engine/toolcalls.py).
    """
    native = takes_tools(tokenizer)
    chat = template_messages(messages) if native else generic_messages(messages, tools)
    if not getattr(tokenizer, "chat_template", None):
        return default_template(chat)
    options = {"tools": list(tools)} if native and tools else {}
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **options)
    except TemplateSyntaxError:
        raise  # a broken template is the server's fault: let it surface as a 500 with its traceback
    except TemplateError as exc:  # the template's own raise_exception(...) about the conversation
        raise ChatTemplateError(f"The model's chat template rejected the messages: {exc}") from exc
    return _without_double_bos(tokenizer, text)


def _without_double_bos(tokenizer: Any, text: str) -> str:
    """Drop a BOS token the template wrote when encoding adds one anyway, so the model sees exactly one."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer.bos_token_id in tokenizer("")["input_ids"]:
        return text[len(bos) :]
    return text
