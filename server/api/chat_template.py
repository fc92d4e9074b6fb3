"""Chat messages to a prompt, as vLLM makes one: the chat template in use (`--chat-template FILE`, else the
tokenizer's own) renders the messages, text parts joined by newlines, into a string that is then tokenized
without the tokenizer's special tokens unless asked (the template writes its own).

Shared by `/v1/chat/completions` and `/tokenize`, so that `/tokenize` with messages gives exactly the token
ids a chat request runs on.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import PreTrainedTokenizerBase

from server.api.schemas import ChatMessage, ChatTemplateOptions
from server.api.tokens import Prompt
from server.errors import InvalidRequestError
from server.validation import (
    check_chat_ending,
    check_content_part,
    check_message_extras,
    check_neutral,
    check_template_kwargs,
)


class ChatTemplateFileError(ValueError):
    """--chat-template names a file that cannot be read or is not a Jinja template."""


def read_chat_template(path: Path) -> str:
    """The template text of a --chat-template file, checked for Jinja syntax (so the server fails at start,
    not on the first chat request)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateFileError(f"cannot read chat template {path}: {exc}") from exc
    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateError as exc:
        raise ChatTemplateFileError(f"chat template {path} is not a valid Jinja template: {exc}") from exc
    return text


def model_chat_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The tokenizer's own default chat template, if it has one (a dict of named templates: the default)."""
    template: Any = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def _content(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    # vLLM's "string" content format: the text parts, one per line.
    return "\n".join(check_content_part(p.type, p.text, index) for p in message.content)


def message_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as a template sees them: role, content as one string, and name when given."""
    out = []
    for i, m in enumerate(messages):
        check_message_extras(m.model_extra or {}, i)
        entry: dict[str, Any] = {"role": m.role, "content": _content(m, i)}
        if m.name is not None:
            entry["name"] = m.name
        out.append(entry)
    return out


def _reserved_kwargs(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """Names chat_template_kwargs may not use: apply_chat_template's own arguments (`tokenize=True` would
    change what it returns) and the variables it sets."""
    params = set(inspect.signature(tokenizer.apply_chat_template).parameters) - {"kwargs"}
    return params | {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message"}


def render(
    tokenizer: PreTrainedTokenizerBase, template: str | None, messages: Sequence[ChatMessage],
    options: ChatTemplateOptions,
) -> str:
    """The prompt text of a conversation (a 400 for anything the template or the request cannot do)."""
    check_neutral({"chat_template": options.chat_template})
    if template is None:
        raise InvalidRequestError(
            "this model has no chat template: start the server with --chat-template FILE (a Jinja template, "
            "as in a tokenizer_config.json), or use /v1/completions",
            param="messages", code="no_chat_template",
        )
    conversation = message_dicts(messages)
    check_chat_ending(options.add_generation_prompt, options.continue_final_message, conversation[-1]["role"])
    kwargs = options.chat_template_kwargs or {}
    check_template_kwargs(kwargs, _reserved_kwargs(tokenizer))
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            chat_template=template,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message,
            tokenize=False,
            **kwargs,
        )
    # The template is code run on the client's input: its refusals (raise_exception), and type errors from
    # odd chat_template_kwargs, are the client's to fix.
    except (TemplateError, ValueError, TypeError) as exc:
        raise InvalidRequestError(
            f"the chat template could not render these messages: {exc}", param="messages",
            code="chat_template_error",
        ) from None
    assert isinstance(text, str)  # tokenize=False on one conversation returns its text
    return text


def _render_and_encode(
    tokenizer: PreTrainedTokenizerBase,
    template: str | None,
    messages: Sequence[ChatMessage],
    options: ChatTemplateOptions,
    add_special_tokens: bool,
) -> tuple[str, list[int]]:
    text = render(tokenizer, template, messages, options)
    return text, tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


async def chat_prompt(
    tokenizer: PreTrainedTokenizerBase,
    template: str | None,
    messages: Sequence[ChatMessage],
    options: ChatTemplateOptions,
    add_special_tokens: bool,
) -> Prompt:
    """The conversation as one prompt (rendered and tokenized off the event loop)."""
    text, ids = await asyncio.to_thread(_render_and_encode, tokenizer, template, messages, options,
                                        add_special_tokens)
    if not ids:
        raise InvalidRequestError("the chat template rendered these messages as an empty prompt",
                                  param="messages")
    return Prompt(tuple(ids), text)
