"""The `logprobs` object of a `/v1/perplexity` document: each scored token's log-probs under the base, the
memory and the mixture, with each model's top alternatives.

Built off the event loop (a few thousand tokens times 2k alternatives is real Python work). Token text
comes in two forms: `tokens` are the pieces of the decoded input (for display: they concatenate to it),
alternatives are single tokens decoded alone (as OpenAI's `top_logprobs` keys are).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.api.tokens import TokenStrings, finite_logprob
from server.request import TokenCandidates, TokenScores

_LEFT_CONTEXT = 6  # tokens decoded before each one: more than a UTF-8 character's bytes (4) can span


def token_pieces(strings: TokenStrings, ids: Sequence[int], start: int, stop: int) -> list[str]:
    """The text each of ids[start:stop] adds to the decoded document.

    Each piece depends on its position only, so pieces of any split of a document into ranges concatenate
    to its decoded text. A token that ends inside a UTF-8 character adds '' and the one that completes it
    adds the whole character; a few tokens of left context keep the tokenizer's spacing rules.
    """
    pieces = []
    for i in range(start, stop):
        left = max(0, i - _LEFT_CONTEXT)
        before = strings.decode(ids[left:i]).rstrip("\ufffd")  # an unfinished character is not yet text
        upto = strings.decode(ids[left : i + 1])
        pieces.append("" if upto.endswith("\ufffd") else upto[len(before) :])
    return pieces


def _values(values: Sequence[float] | None, leading_null: bool) -> list[float | None] | None:
    if values is None:
        return None
    return ([None] if leading_null else []) + [finite_logprob(v) for v in values]


def _alternatives(strings: TokenStrings, c: TokenCandidates) -> list[dict[str, Any]]:
    """Distinct candidates, best first under the mixture (the base when there is no memory)."""
    rank = c.mixed if c.mixed is not None else c.base
    seen: set[int] = set()
    out = []
    for j in sorted(range(len(c.token_ids)), key=lambda j: -rank[j]):
        token_id = c.token_ids[j]
        if token_id in seen:  # in both models' top k
            continue
        seen.add(token_id)
        entry: dict[str, Any] = {"token": strings(token_id), "token_id": token_id,
                                 "base": finite_logprob(c.base[j])}
        if c.memory is not None:
            entry["memory"] = finite_logprob(c.memory[j])
        if c.mixed is not None:
            entry["mixed"] = finite_logprob(c.mixed[j])
        out.append(entry)
    return out


def logprobs_object(strings: TokenStrings, ids: Sequence[int], scores: TokenScores,
                    from_start: bool) -> dict[str, Any]:
    """One document's `logprobs`. `from_start` (the request scored its first window): the arrays begin at
    token 0, which has no log-prob (null), so that the parts of a text scored in parts concatenate."""
    start = 0 if from_start else scores.offset
    stop = scores.offset + len(scores.base)
    lead = scores.offset - start  # 1 or 0 entries without a log-prob
    top = None
    if scores.top is not None:
        top = [None] * lead + [_alternatives(strings, c) for c in scores.top]
    return {
        "offset": start,
        "tokens": token_pieces(strings, ids, start, stop),
        "token_ids": list(ids[start:stop]),
        "base": _values(scores.base, bool(lead)),
        "memory": _values(scores.memory, bool(lead)),
        "mixed": _values(scores.mixed, bool(lead)),
        "top_logprobs": top,
    }
