"""The step's mix phase on the device: the batch's mixture (`memories.mixing.apply`), the draw, and what the
host will read, by name.

`Mixer.mix` turns a forward's logits into the next tokens (written where the next decode step reads its
input) and returns the tensors the host needs as a dict of names (`Readback`); the engine reads them all
in its one `fetch` and hands the host arrays back to `Mixer.sampled`, which turns them into per-row
results. Nothing here reads the device: a decode step keeps its one host synchronisation.

Routers with context features keep each row's advantage EMAs on the device (`ContextState`): the mix
phase advances them with the token each row took, and `advance_prompts` with a prompt chunk's targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from memories.mixing import Part, apply, base_weight, memory_logprobs
from memories.router import advantage_emas, routed_part
from server.context import ContextState, prompt_targets, target_logprobs
from server.request import TokenLogprob
from server.runner import MemoryGroup, ModelRunner, RowBatch, StepLogits
from server.sampler import DRAFT, accept, propose, sample, speculative_uniforms, top_logprobs
from server.scheduler import PrefillChunk
from server.sequence import Sequence

Readback = dict[str, torch.Tensor]  # what a step's host reads, by name (device tensors)
Host = dict[str, np.ndarray]  # the same names, read


@dataclass(frozen=True)
class Sampled:
    """What the host read back from one step, per row."""

    tokens: np.ndarray  # [B]
    logprobs: dict[int, TokenLogprob]  # row -> the chosen token's log-prob and top alternatives
    prompt_logprobs: dict[int, tuple[TokenLogprob | None, ...]]  # echo row -> per prompt token
    accepted: np.ndarray | None = None  # [B] speculative rows: the position's acceptance test passed


def group_part(
    g: MemoryGroup, base_lp: torch.Tensor, mem_lp: torch.Tensor, context: torch.Tensor | None = None
) -> Part:
    """One memory group's `Part` of its rows' mixture ([b, V], or [b, T, V] in a round): αᵢ·pᵢ at each row's
    fixed α, or, for `"alpha": "auto"` rows, α_t from the memory's router on the base's own log-probs
    `base_lp` [B, ...] and the memory's (one batched call for the whole group; their base weight is 1 so
    far), and the rows' context features [b, K] when the router reads them (`ContextState`)."""
    log_alpha = g.log_alpha.view(-1, *([1] * (mem_lp.dim() - 1)))  # [b, 1] or [b, 1, 1]
    rows = None if g.whole_batch else g.rows_dev
    if g.router is None:
        return Part(mem_lp, log_alpha, rows=rows)
    routed = g.routed.view_as(log_alpha) if g.routed is not None else None
    base_rows = base_lp if rows is None else base_lp.index_select(0, rows)
    return routed_part(
        g.router, base_rows, mem_lp, context, routed, log_alpha if routed is not None else None, rows
    )


def top_readback(prefix: str, lp: torch.Tensor, tokens: torch.Tensor, n: int) -> Readback:
    """The chosen tokens' log-probs and the top n of log-distributions lp [W, ..., V] (tokens [W, ...])."""
    top_v, top_i = top_logprobs(lp, n)  # [W, ..., n]
    chosen = lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [W, ...]
    return {f"{prefix}chosen": chosen, f"{prefix}top_v": top_v, f"{prefix}top_i": top_i}


def token_logprob(host: Host, prefix: str, at: tuple[int, ...], token: int, n: int) -> TokenLogprob:
    """One position's `TokenLogprob` from `top_readback`'s fields, read
    (`at`: its index, n: top alternatives)."""
    top = tuple(
        zip(host[f"{prefix}top_i"][at][:n].tolist(), host[f"{prefix}top_v"][at][:n].tolist(), strict=True)
    )
    return TokenLogprob(token, float(host[f"{prefix}chosen"][at]), top)


class Mixer:
    """Mixes and draws a step's rows on the device; keeps the routers' per-row context features."""

    def __init__(self, runner: ModelRunner, num_slots: int) -> None:
        self.runner = runner
        self.context = ContextState(num_slots, runner.device)  # routers' advantage EMAs per row

    def mix(self, rows: RowBatch, logits: StepLogits, is_prefill: bool) -> Readback:
        """Mix every row, draw its next token (written as the slot's next input), and name what the
        host reads: tokens [B]; with log-probs chosen/top_v/top_i [W, ...]; echo rows' prompt.{i}.*;
        `accepted` [B]."""
        base_lp = torch.log_softmax(logits.base.float(), dim=-1)  # [B, V]
        mem_lps: dict[str, torch.Tensor] = {}
        parts = []
        for g in rows.groups:
            mem = logits.memories.get(g.name)
            if mem is None:  # the memory failed: its rows are failed in postprocessing
                continue
            mem_lp = mem_lps[g.name] = memory_logprobs(mem, g.temperature)  # [b, V] log softmax(mem / T)
            parts.append(group_part(g, base_lp, mem_lp, self.group_context(g)))
        logp = apply(base_lp, parts, rows.log_base_weight)  # [B, V] (1 − Σ αᵢ)·p_base + Σ αᵢ·pᵢ, in logs
        counter = None
        if rows.sampling.any_sampled:
            # Index of the token being drawn = tokens the base has cached
            # (its length after this step's forward).
            counter = self.runner.kv(None).lengths.index_select(0, rows.slots_dev)  # [B]
        out: Readback = {}
        if rows.spec_rows:
            tokens, out["accepted"] = self._virtual_draft(rows, mem_lps, logp, counter)
        else:
            tokens = sample(logp, rows.sampling, counter)  # [B]
        out["tokens"] = tokens
        self.runner.tokens.index_copy_(0, rows.slots_dev, tokens)  # the next decode step's input
        # routed rows' EMAs take the new token's log-probs (on the device, whole groups)
        for g in rows.groups:
            if g.name in mem_lps:
                self.advance_context(g, tokens, base_lp, mem_lps[g.name])
        if rows.logprob_rows:
            w = rows.logprob_rows_dev
            # [W, ...]
            out |= top_readback("", logp.index_select(0, w), tokens.index_select(0, w), rows.num_top)
        if is_prefill:
            out |= self._prompt_readback(rows, logits)
        return out

    def sampled(self, rows: RowBatch, logits: StepLogits, host: Host) -> Sampled:
        """`mix`'s fields, read, as per-row results
        (echo rows: those `logits.prompt` has, unless they failed)."""
        tok = host["tokens"]
        logprobs = {
            i: token_logprob(host, "", (j,), int(tok[i]), rows.seqs[i].params.logprobs or 0)
            for j, i in enumerate(rows.logprob_rows)
        }
        prompt: dict[int, tuple[TokenLogprob | None, ...]] = {}
        for i in logits.prompt:
            if i not in logits.failed:
                ids = rows.seqs[i].token_ids
                prompt[i] = (None, *(
                    token_logprob(host, f"prompt.{i}.", (t,), ids[t + 1], len(host[f"prompt.{i}.top_i"][t]))
                    for t in range(len(ids) - 1)
                ))
        return Sampled(tok, logprobs, prompt, host.get("accepted"))

    def group_context(self, g: MemoryGroup) -> torch.Tensor | None:
        """[b, K] the group's rows' advantage EMAs when its router reads context features, else None."""
        if g.router is None or not g.router.context_decays:
            return None
        return self.context.rows(g.name, g.router.context_decays, g.slots_dev)

    def advance_context(
        self, g: MemoryGroup, tokens: torch.Tensor, base_lp: torch.Tensor, mem_lp: torch.Tensor
    ) -> None:
        """The group's rows took `tokens` [B] (whole batch) at distributions base_lp [B, V] and mem_lp [b, V]
        (the group's rows): advance their EMAs on the device. Fixed-α rows of the group advance too
        (unread, harmless)."""
        if g.router is None or not g.router.context_decays:
            return
        if not g.whole_batch:
            tokens, base_lp = tokens.index_select(0, g.rows_dev), base_lp.index_select(0, g.rows_dev)
        y = tokens.unsqueeze(-1)  # [b, 1]
        self.context.advance(
            g.name, g.router.context_decays, g.slots_dev, base_lp.gather(-1, y).squeeze(-1),
            mem_lp.gather(-1, y).squeeze(-1),
        )

    def advance_prompts(self, chunks: list[PrefillChunk], logits: StepLogits) -> None:
        """Context-routed prompt chunks: their positions' targets' log-probs advance the rows' EMAs
        (from zero for a chunk at position 0), before the last chunk's position is mixed. One chunk at a
        time, on the device."""
        for c in chunks:
            by_model = logits.scored.get(c.seq.seq_id)
            use = c.seq.memories[0] if c.seq.memories else None
            if (by_model is None or use is None or use.router is None or use.name not in by_model
                    or None not in by_model):
                continue  # not context-routed, or a model failed (the row fails)
            start = c.start[None]
            targets = self.runner.upload(prompt_targets(c.seq.token_ids, start, c.end))  # [n]
            base_t, mem_t = target_logprobs(by_model[None], by_model[use.name], use.temperature, targets)
            self.context.prompt(use.name, use.router.context_decays, c.seq.row, start, base_t, mem_t)

    def _virtual_draft(
        self,
        rows: RowBatch,
        mem_lps: dict[str, torch.Tensor],
        logp: torch.Tensor,
        counter: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B] of a step that is not a round, and the speculative rows' acceptance tests [B].

        A speculative row's token goes through the same draft, acceptance test and residual draw as in a
        round (from the memory's distribution at this position), so its tokens never depend on which
        steps were rounds; the other rows (no draft) draw exactly as `sample` does.
        """
        q = torch.zeros_like(logp)  # [B, V]; rows without one memory never use theirs (they do not draft)
        for g in rows.groups:
            if g.name in mem_lps:
                q.index_copy_(0, g.rows_dev, mem_lps[g.name])
        u = speculative_uniforms(rows.sampling.seed, counter) if counter is not None else None  # [3, B]
        drafts = propose(q, rows.sampling, u[DRAFT] if u is not None else None)
        return accept(logp, drafts, rows.spec_mask, rows.sampling, u)

    def _prompt_readback(self, rows: RowBatch, logits: StepLogits) -> Readback:
        """Echo rows: the mixed log-prob of each prompt token given the ones before it, and the top-n."""
        out: Readback = {}
        for i, by_model in logits.prompt.items():
            if i in logits.failed:
                continue
            seq = rows.seqs[i]
            targets = self.runner.upload(np.asarray(seq.token_ids[1:], dtype=np.int64))  # [T-1]
            lp = prompt_mixture(seq, by_model, targets)  # [T, V]
            # [T-1, ...]
            out |= top_readback(f"prompt.{i}.", lp[:-1], targets, seq.params.prompt_logprobs or 0)
        return out


def prompt_mixture(
    seq: Sequence, by_model: dict[str | None, torch.Tensor], targets: torch.Tensor
) -> torch.Tensor:
    """[T, V] the mixture at every prompt position of an echo row, from each model's logits [T, V]: its fixed
    α's, or (`"alpha": "auto"`) its router's α per position, reading, when it has context features, each
    position's EMAs over the prompt before it (the last position's: all of it)."""
    lp = torch.log_softmax(by_model[None].float(), dim=-1)  # [T, V]
    parts = []
    for use in seq.memories:
        mem_lp = memory_logprobs(by_model[use.name], use.temperature)  # [T, V]
        if use.router is None:
            parts.append(Part(mem_lp, math.log(use.alpha)))
            continue
        context = None
        if use.router.context_decays:
            y = targets.unsqueeze(-1)  # [T-1, 1]
            before, after = advantage_emas(
                (mem_lp[:-1].gather(-1, y) - lp[:-1].gather(-1, y)).squeeze(-1), use.router.context_decays
            )
            context = torch.cat([before, after.float().unsqueeze(0)])  # [T, K]
        parts.append(routed_part(use.router, lp, mem_lp, context))
    w = base_weight([use.alpha for use in seq.memories])  # 1 − Σ αᵢ (1 routed: its router weighs the base)
    return apply(lp, parts, math.log(w) if w > 0 else float("-inf"))
