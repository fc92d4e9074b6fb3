"""The server's tokenizer over HTTP, in vLLM's shapes: `POST /tokenize` (a prompt as completions tokenizes it,
or messages as chat renders them), `POST /detokenize`, `GET /tokenizer_info`; and `GET /version`.

Evaluation harnesses use these instead of loading the tokenizer themselves (lm-evaluation-harness's
`local-completions` looks for them), so they answer with exactly what the generation endpoints run on.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from transformers import PreTrainedTokenizerBase

from server import __version__
from server.api.auth import check_api_key
from server.api.chat_template import chat_prompt
from server.api.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    VersionInfo,
)
from server.api.state import ServingState
from server.errors import InvalidRequestError
from server.validation import check_token_ids

router = APIRouter()

_CHAT_ONLY = ("add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs")


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


@router.post("/tokenize", response_model=TokenizeResponse, dependencies=[Depends(check_api_key)])
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """Token ids of `prompt` (special tokens added by default, as `/v1/completions` does) or of `messages`
    (rendered by the chat template, special tokens not added by default, as `/v1/chat/completions` does).
    `max_model_len` is the context a request on `model` (the base by default, or a memory) may use."""
    state: ServingState = request.app.state.memdec
    serving = state.ready()
    memory = serving.model_memory(body.model) if body.model is not None else None
    tokenizer = serving.base.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give exactly one of 'prompt' or 'messages'", param="prompt")
    if body.messages is not None:
        add_special = False if body.add_special_tokens is None else body.add_special_tokens
        ids = list((await chat_prompt(tokenizer, serving.chat_template, body.messages, body,
                                      add_special)).token_ids)
    else:
        chat_options = sorted(set(_CHAT_ONLY) & body.model_fields_set)
        if chat_options:
            raise InvalidRequestError(f"{', '.join(chat_options)} apply to 'messages' only",
                                      param=chat_options[0])
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        assert body.prompt is not None  # exactly one of the two is set
        ids = await asyncio.to_thread(_encode, tokenizer, body.prompt, add_special)
    return {
        "count": len(ids),
        "max_model_len": serving.context_of(memory),
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None,
    }


@router.post("/detokenize", response_model=DetokenizeResponse, dependencies=[Depends(check_api_key)])
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    """The text of token ids, special tokens included (so that it tokenizes back to the same ids)."""
    state: ServingState = request.app.state.memdec
    serving = state.ready()
    if body.model is not None:
        serving.model_memory(body.model)  # 404 for a name the server does not serve
    check_token_ids(body.tokens, serving.base.vocab_size, "tokens")
    return {"prompt": await asyncio.to_thread(serving.token_strings.decode, body.tokens)}


def _jsonable(value: Any) -> Any:
    """A tokenizer's init arguments as JSON: added tokens by their text, mapping keys as strings."""
    if hasattr(value, "content"):  # AddedToken
        return value.content
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def tokenizer_info(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> dict[str, Any]:
    """vLLM's `/tokenizer_info`: the tokenizer's init arguments without file paths, its special tokens as
    strings, and the chat template the server uses."""
    config = {
        k: v for k, v in tokenizer.init_kwargs.items()
        if not (k.endswith("_file") or k in ("name_or_path", "chat_template"))
    }
    special = {name: getattr(tokenizer, name, None)
               for name in ("eos_token", "bos_token", "pad_token", "unk_token")}
    return {**_jsonable(config), **special, "tokenizer_class": type(tokenizer).__name__,
            "chat_template": chat_template}


@router.get("/tokenizer_info", response_model=TokenizerInfo, dependencies=[Depends(check_api_key)])
async def get_tokenizer_info(request: Request) -> dict[str, Any]:
    """The base model's tokenizer configuration (what memories must share) and the chat template in use."""
    state: ServingState = request.app.state.memdec
    serving = state.ready()
    return tokenizer_info(serving.base.tokenizer, serving.chat_template)


@router.get("/version", response_model=VersionInfo)
async def version() -> dict[str, str]:
    """memdec's version (open like /health: it says nothing about the models)."""
    return {"version": __version__}
