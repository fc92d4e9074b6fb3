"""Prompts to token ids and token ids back to the strings OpenAI's `logprobs` object carries."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from server.errors import InvalidRequestError
from server.request import TokenLogprob
from server.validation import MAX_PROMPTS, check_token_ids

LOGPROB_FLOOR = -9999.0  # what OpenAI and vLLM send for -inf (JSON has no infinity)


@dataclass(frozen=True)
class Prompt:
    token_ids: tuple[int, ...]
    text: str | None  # the client's own string; None when it sent token ids


def split_prompts(prompt: str | list[Any], param: str) -> list[str | list[int]]:
    """The four accepted shapes as a list of single prompts (a string, or a token-id list)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError(f"'{param}' must not be empty", param=param)
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if len(prompt) > MAX_PROMPTS:
        raise InvalidRequestError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}",
                                  param=param)
    return list(prompt)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


async def tokenize(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str | list[int]], vocab_size: int, param: str
) -> list[Prompt]:
    """Encode string prompts (off the event loop) and check token-id prompts against the vocabulary."""
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(await asyncio.to_thread(_encode, tokenizer, texts) if texts else [])
    out = []
    for p in prompts:
        if isinstance(p, str):
            ids = tuple(next(encoded))
            if not ids:
                raise InvalidRequestError(f"'{param}' contains an empty string", param=param)
            out.append(Prompt(ids, p))
        else:
            if not p:
                raise InvalidRequestError(f"'{param}' contains an empty token list", param=param)
            check_token_ids(p, vocab_size, param)
            out.append(Prompt(tuple(p), None))
    return out


class TokenStrings:
    """token id -> its text as a single token, cached (the same few thousand ids recur in logprobs)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.decode([token_id])
        return text

    def decode(self, token_ids: Sequence[int]) -> str:
        text = self._tokenizer.decode(list(token_ids), skip_special_tokens=False)
        assert isinstance(text, str)  # one id list decodes to one string (the list type is for batches)
        return text


def finite_logprob(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps NaN to the floor


class LogprobsBuilder:
    """Accumulates one choice's OpenAI `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset.

    As in vLLM, `top_logprobs` holds the top-N tokens plus the chosen one, `text_offset` advances by the
    length of each token's own text, and an entry without a log-prob (the first prompt token) is null.
    `return_tokens_as_token_ids` names tokens "token_id:<id>" so that no two collide.
    """

    def __init__(self, strings: TokenStrings, num_top: int, offset: int = 0, as_ids: bool = False) -> None:
        # vLLM's `return_tokens_as_token_ids`: "token_id:<id>" instead of text that may not round-trip.
        self.strings: Callable[[int], str] = (lambda t: f"token_id:{t}") if as_ids else strings
        self.num_top = num_top
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None] | None) -> None:
        for i, token_id in enumerate(token_ids):
            entry = entries[i] if entries is not None and i < len(entries) else None
            token = self.strings(token_id)
            self.tokens.append(token)
            self.text_offset.append(self.offset)
            self.offset += len(token)
            if entry is None:
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
                continue
            chosen = finite_logprob(entry.logprob)
            self.token_logprobs.append(chosen)
            top: dict[str, float] = {}
            for tid, lp in (*entry.top[: self.num_top], (token_id, chosen)):
                key = self.strings(tid)
                # Distinct ids can share a text (e.g. byte tokens of split characters): keep the best, so
                # `max(top.values())` is still the best log-prob, which harnesses use to test greediness.
                top[key] = max(top.get(key, LOGPROB_FLOOR), finite_logprob(lp))
            self.top_logprobs.append(top)

    def take(self) -> dict[str, Any]:
        """The object so far; a streaming caller starts the next chunk's object empty."""
        out = {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


class ChatLogprobsBuilder:
    """Accumulates one chat choice's `logprobs.content`: per token its text, log-prob, UTF-8 bytes and exactly
    its top N alternatives (OpenAI's chat shape: unlike the legacy object, the chosen token is not added to
    them, and alternatives are a list, so tokens that share a text all appear)."""

    def __init__(self, strings: TokenStrings, num_top: int, as_ids: bool = False) -> None:
        self.strings: Callable[[int], str] = (lambda t: f"token_id:{t}") if as_ids else strings
        self.num_top = num_top
        self.content: list[dict[str, Any]] = []

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self.strings(token_id)
        return {"token": token, "logprob": finite_logprob(logprob), "bytes": list(token.encode("utf-8"))}

    def add(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob] | None) -> None:
        for i, token_id in enumerate(token_ids):
            # The engine gives every generated token its entry when log-probs were asked for.
            assert entries is not None and i < len(entries), "a generated token without its log-prob"
            entry = entries[i]
            top = [self._entry(tid, lp) for tid, lp in entry.top[: self.num_top]]
            self.content.append({**self._entry(token_id, entry.logprob), "top_logprobs": top})

    def take(self) -> dict[str, Any]:
        """The object so far; a streaming caller starts the next chunk's object empty."""
        out = {"content": self.content}
        self.content = []
        return out
