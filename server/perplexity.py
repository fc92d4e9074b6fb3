"""Perplexity jobs: both models' target log-probs computed once per window, mixed per alpha.

A job is scheduled like any other work (`Scheduler.jobs`): each SCORE step runs one batch of windows
(at most `BATCH_TOKENS` tokens, which bounds the pause it imposes on decoding) through the model runner
(base and memory overlapped on two streams, a failing memory fails the job only) and accumulates on the
device; the host reads the sums once, when the job is done.

A job may score a range of each document's windows (`first_window`, `max_windows`) and keep per-token
log-probs (`token_logprobs`); with top alternatives the runner returns whole next-token distributions,
so those batches are a quarter of the size, which keeps both models' distributions within the usual
memory bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from memories.mixing import Part, apply, mix_logprobs, mix_many
from memories.perplexity import BATCH_LOGITS, BATCH_TOKENS, Window, sliding_windows, window_batches
from memories.router import Router, advantage_emas
from server.errors import InvalidRequestError
from server.loader import LoadedModel
from server.request import (
    DocumentPerplexity,
    PerplexityRequest,
    PerplexityResult,
    PerplexityScore,
    TokenCandidates,
    TokenScores,
)
from server.transfer import fetch

if TYPE_CHECKING:
    from server.runner import ModelRunner


def document_windows(
    num_tokens: int, context: int, stride: int, first: int = 0, count: int | None = None
) -> tuple[list[Window], int]:
    """(windows [first, first + count) of a document's sliding windows, how many it has in all)."""
    windows = list(sliding_windows(num_tokens, context, stride))
    return windows[first : None if count is None else first + count], len(windows)


class _TokenLog:
    """One document's per-token log-probs (and top candidates), gathered on the device batch by batch."""

    # base/memory/mixed: [n] per batch; top_*: [n, K] per batch (ids, then each model's log-prob of them).
    FIELDS = ("base", "memory", "mixed", "top_ids", "top_base", "top_memory", "top_mixed")

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.FIELDS}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every field that was kept, concatenated over the batches (a field never kept is left out)."""
        return {name: torch.cat(p) for name, p in self.parts.items() if p}


class PerplexityJob:
    """One request's windows, in batches, and its running sums (on the device)."""

    def __init__(
        self,
        request: PerplexityRequest,
        base: LoadedModel,
        memories: list[LoadedModel],
        context: int,
        stride: int,
        router: Router | None = None,
    ) -> None:
        self.request = request
        # `"alpha": "auto"`: the memory's router sets α at every position, from both whole distributions
        # (the toolkit's `memdec memory router` evaluation applies the same `Router.log_weights`
        # to the same windows).
        self.router = router if request.routed else None
        if self.router is not None and self.router.context_decays and request.first_window:
            # Its context features average over every scored position before each one,
            # from the document's start.
            raise InvalidRequestError(
                '"alpha": "auto" with this memory\'s router (context features) scores a document '
                "from its first window: first_window must be 0",
                param="first_window",
            )
        self.memories = memories  # held from the registry while the job lives, one per name of `memory_names`
        self.memory_names = request.memory_names if memories else ()
        # Several memories: one mixture, Σ αᵢ·pᵢ + (1 − Σ αᵢ)·p_base, with request.alphas as the weights (or,
        # `separately`, each memory's own mixture at its α).
        self.several = len(self.memory_names) > 1
        self.separately = self.several and request.separately
        self.context, self.stride = context, stride
        self.device = base.device
        self.top_k = request.token_logprobs or 0
        self.wants_distributions = request.wants_distributions
        self._alphas = torch.tensor(request.alphas, dtype=torch.float32).to(self.device)  # [A]
        zeros = torch.zeros(len(request.documents), dtype=torch.float64)
        self._base_nll = zeros.clone().to(self.device)  # [D]
        self._mem_nll = zeros.clone().to(self.device)  # [D]
        num_mixtures = (
            1 if (self.several and not self.separately) or self.router is not None else len(request.alphas)
        )
        self._mixed_nll = torch.zeros(  # [D, A]
            len(request.documents), num_mixtures, dtype=torch.float64
        ).to(self.device)
        self._counts = [0] * len(request.documents)
        self._num_windows = [0] * len(request.documents)
        self._offsets = [0] * len(request.documents)  # first scored position of each document's range
        # A context router's advantage EMAs [K] after each document's positions so far
        # (None: before its first).
        self._context: list[torch.Tensor | None] = [None] * len(request.documents)
        self._tokens = (
            [_TokenLog() for _ in request.documents] if request.token_logprobs is not None else None
        )
        self._batches = self._all_batches(base.vocab_size)
        self.current: tuple[int, torch.Tensor, list[Window]] | None = next(self._batches, None)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def done(self) -> bool:
        return self.current is None

    def _all_batches(self, vocab: int) -> Iterator[tuple[int, torch.Tensor, list[Window]]]:
        max_logits = BATCH_LOGITS // 4 if self.wants_distributions else BATCH_LOGITS
        for d, doc in enumerate(self.request.documents):
            ids = torch.tensor(doc).to(self.device)  # [N]
            windows, self._num_windows[d] = document_windows(
                len(doc), self.context, self.stride, self.request.first_window, self.request.max_windows
            )
            self._offsets[d] = windows[0].score_from if windows else len(doc)
            for batch in window_batches(windows, BATCH_TOKENS, max_logits, vocab):
                yield d, ids, batch

    def score_next(self, runner: ModelRunner) -> None:
        """Score the current batch of windows in the base and every memory (one SCORE step) and account it.
        A memory's failure is the job's: raised here, after the others' forwards finished."""
        assert self.current is not None
        _, ids, windows = self.current
        keys = list(zip(self.memory_names, self.request.temperatures, strict=True))
        lps = runner.score(keys, ids, windows, self.wants_distributions)
        mems = [lps[name] for name in self.memory_names]
        failed = next((m for m in mems if isinstance(m, Exception)), None)
        if failed is not None:
            raise failed
        base = lps[None]
        assert isinstance(base, torch.Tensor)
        self.add(base, mems if self.several else mems[0] if mems else None)  # type: ignore[arg-type]

    def add(self, base_lp: torch.Tensor, mem_lp: torch.Tensor | list[torch.Tensor] | None) -> None:
        """Account the current batch's target log-probs ([B, S] each; whole distributions [B, S, V] when
        `wants_distributions`) and move to the next batch. With several memories `mem_lp` is a list, one
        [B, S] per memory (no distributions: top alternatives are refused for several memories)."""
        assert self.current is not None
        if isinstance(mem_lp, list):
            self._add_several(base_lp, mem_lp)
            return
        d, ids, windows = self.current
        weights = None  # the router's (log α_t, log(1 − α_t)) [B, S]
        if self.router is not None and mem_lp is not None:
            context = None
            # the windows' scored positions, in text order: the toolkit's sequence
            if self.router.context_decays:
                targets = torch.stack([ids[w.score_from : w.end] for w in windows]).unsqueeze(-1)  # [B, S, 1]
                adv = (mem_lp.gather(-1, targets) - base_lp.gather(-1, targets)).flatten()  # [B*S]
                before, self._context[d] = advantage_emas(adv, self.router.context_decays, self._context[d])
                context = before.view(*targets.shape[:2], -1)  # [B, S, K]
            weights = self.router.log_weights(base_lp, mem_lp, context)
        if self.wants_distributions:
            if self.top_k:
                self._keep_top(d, base_lp, mem_lp, weights)
            targets = torch.stack([ids[w.score_from : w.end] for w in windows]).unsqueeze(-1)  # [B, S, 1]
            base_lp = base_lp.gather(-1, targets).squeeze(-1)
            mem_lp = mem_lp.gather(-1, targets).squeeze(-1) if mem_lp is not None else None
        self._base_nll[d] -= base_lp.double().sum()
        mixed = None
        if mem_lp is not None:
            self._mem_nll[d] -= mem_lp.double().sum()
            if weights is not None:
                mixed = apply(base_lp, [Part(mem_lp, *weights)]).flatten().unsqueeze(0)  # [1, B*S]
            else:
                mixed = mix_logprobs(  # [A, B*S]
                    base_lp.flatten().unsqueeze(0), mem_lp.flatten().unsqueeze(0), self._alphas
                )
            self._mixed_nll[d] -= mixed.double().sum(dim=-1)
        if self._tokens is not None:
            parts = self._tokens[d].parts
            parts["base"].append(base_lp.flatten())
            if mem_lp is not None and mixed is not None:
                parts["memory"].append(mem_lp.flatten())
                if len(mixed):  # the first alpha's (a request with a memory but no alpha mixes nothing)
                    parts["mixed"].append(mixed[0])
        self._counts[d] += base_lp.numel()
        self.current = next(self._batches, None)

    def _add_several(self, base_lp: torch.Tensor, mem_lps: list[torch.Tensor]) -> None:
        assert self.current is not None and not self.wants_distributions
        d = self.current[0]
        if self.separately:  # each memory's own mixture at its own α
            for i, (m, a) in enumerate(zip(mem_lps, self.request.alphas, strict=True)):
                self._mixed_nll[d, i] -= mix_logprobs(base_lp.flatten(), m.flatten(), a).double().sum()
            self._base_nll[d] -= base_lp.double().sum()
            self._counts[d] += base_lp.numel()
            self.current = next(self._batches, None)
            return
        mixed = mix_many(
            base_lp.flatten(), [(m.flatten(), a) for m, a in zip(mem_lps, self.request.alphas, strict=True)]
        )
        self._base_nll[d] -= base_lp.double().sum()
        self._mixed_nll[d, 0] -= mixed.double().sum()
        if self._tokens is not None:
            self._tokens[d].parts["base"].append(base_lp.flatten())
            self._tokens[d].parts["mixed"].append(mixed)
        self._counts[d] += base_lp.numel()
        self.current = next(self._batches, None)

    def _keep_top(
        self,
        d: int,
        base: torch.Tensor,
        mem: torch.Tensor | None,
        weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Each model's top k of this batch ([B, S, V] log-probs),
        with both models' log-probs of every one."""
        assert self._tokens is not None
        k = min(self.top_k, base.shape[-1])
        ids = base.topk(k, dim=-1).indices
        if mem is not None:
            ids = torch.cat([ids, mem.topk(k, dim=-1).indices], dim=-1)  # [B, S, 2k]
        parts = self._tokens[d].parts
        parts["top_ids"].append(ids.flatten(0, 1))
        parts["top_base"].append(base.gather(-1, ids).flatten(0, 1))
        if mem is not None:
            parts["top_memory"].append(mem.gather(-1, ids).flatten(0, 1))
            if weights is not None:  # the router's α_t of each position, for each of its candidates
                log_a, log_1ma = (w.flatten().unsqueeze(-1) for w in weights)  # [B*S, 1]
                parts["top_mixed"].append(
                    apply(parts["top_base"][-1], [Part(parts["top_memory"][-1], log_a, log_1ma)])
                )
            elif len(self._alphas):
                parts["top_mixed"].append(
                    mix_logprobs(parts["top_base"][-1], parts["top_memory"][-1], self._alphas[0])
                )

    def result(self) -> PerplexityResult:
        kept = [log.tensors() for log in self._tokens or []]
        host = fetch(self._base_nll, self._mem_nll, self._mixed_nll, *(t for k in kept for t in k.values()))
        base, mem, mixed = (a.tolist() for a in host[:3])
        per_token = iter(host[3:])
        docs = []
        for d, count in enumerate(self._counts):
            with_memory = bool(self.memories)
            tokens = None
            if kept:
                tokens = self._token_scores(d, {name: next(per_token).tolist() for name in kept[d]})
            docs.append(
                DocumentPerplexity(
                    base=PerplexityScore(base[d], count),
                    mixed=tuple(PerplexityScore(v, count) for v in mixed[d]) if with_memory else (),
                    memory_alone=PerplexityScore(mem[d], count) if with_memory and not self.several else None,
                    num_windows=self._num_windows[d],
                    tokens=tokens,
                )
            )
        return PerplexityResult(self.request_id, tuple(docs), self.context, self.stride)

    def _token_scores(self, d: int, kept: dict[str, list]) -> TokenScores:
        """Document d's kept per-token lists as the result's tuples (a field never kept is None)."""

        def field(name: str) -> tuple | None:
            return tuple(kept[name]) if name in kept else None

        top = None
        if "top_ids" in kept:
            memory, mixed = kept.get("top_memory"), kept.get("top_mixed")
            top = tuple(
                TokenCandidates(
                    tuple(ids),
                    tuple(kept["top_base"][i]),
                    tuple(memory[i]) if memory is not None else None,
                    tuple(mixed[i]) if mixed is not None else None,
                )
                for i, ids in enumerate(kept["top_ids"])
            )
        base = field("base")
        assert base is not None  # every scored token's base log-prob is kept
        return TokenScores(self._offsets[d], base, field("memory"), field("mixed"), top)
