"""Speculative mixing: when it pays, how many tokens the memory drafts per round, and the round itself.

`SpeculativeRound` is one round as the engine's step pipeline runs it: each memory drafts k <= K tokens per
row on the device, the base verifies them in one forward, the mixture is applied at every verified position
(`memories.mixing.apply`), each position's acceptance test and residual draw run, and each row keeps its
accepted prefix plus one token (its caches are set to what it holds, `SequenceKV.accepted`).

A round of k drafts costs k + 1 steps of the memory and one verify forward of the base over k + 1
tokens per row; it emits, per drafting row, E(β, k) = (1 − β^(k+1)) / (1 − β) tokens in expectation,
where β is the memory's per-token acceptance (≥ α for the untransformed mixture). A plain step emits one
token per row. What a round costs depends on the device, the models, the batch size and k in ways no
formula captures well (a CPU pays per token verified, a GPU barely, until the batch makes the verify
compute-bound), so the engine measures it as it runs:

    seconds[b][k]   moving average (weight EMA) of a whole step's seconds at batch-size bucket b
                    (powers of two) drafting k tokens (k = 0: a plain step)
    β[row]          per row, acceptance tests passed / run (counts decaying by ROW_DECAY per step), with
                    PRIOR_WEIGHT tests' worth of its memory's β (the same, decaying by ACCEPT_DECAY)

    k* = argmax over k in 0..K of  (Σ_rows E(β[row], k) + n_plain) / seconds[b][k]     (E(β, 0) = 1)

Each bucket first measures every k once (K first). Afterwards it keeps its k unless another promises
SWITCH_GAIN more, and every PROBE_EVERY-th step re-measures a neighbour (k ± 1) or a plain step, in turn,
so estimates follow the text (β) and the load (seconds) without paying for far-off probes (at a large
batch, a round of K drafts costs several plain steps). Large batches turn speculation
off by themselves: there the verify of k + 1 tokens per row is compute-bound and seconds[b][k] grows
faster than E(β, k). Acceptance is measured on every step, plain ones included: a plain step draws a
speculative row's token by the same accept/residual rule, so the test happens anyway.

Choices only change speed, never tokens: a speculative row's token at each position is a function of
that position's random numbers and distributions (see `server.sampler`), whatever k produced it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from memories.mixing import apply
from server.mixer import Host, Mixer, Readback, group_part, token_logprob, top_readback
from server.request import FinishReason, TokenLogprob
from server.runner import ModelRunner, RowBatch, SpecLogits, SpecPlan
from server.sampler import Drafts, accept
from server.sequence import Sequence

EMA = 0.2  # weight of a new timing in its moving average
PROBE_EVERY = 16  # a bucket re-measures another k every this many steps
SWITCH_GAIN = 1.05  # a new k must promise 5% more tokens/s than the current one to replace it
ACCEPT_DECAY = 0.95  # a memory's acceptance counts, per step: they forget old text within ~20 steps
ROW_DECAY = 0.9  # a row's own counts, per step (a round tests several positions)
PRIOR_ACCEPTANCE = 0.7  # a memory's acceptance until it has been measured (weight: 2 tests)
# Tests' worth of its memory's acceptance in a row's estimate. E(β, k) is convex in β, so noise in a row's
# few tests would inflate the expected tokens of a round: a row's estimate leans on its memory's until it
# has a dozen tests of its own.
PRIOR_WEIGHT = 8.0


def expected_tokens(beta: float, k: int) -> float:
    """Tokens a round of k drafts emits per row when each draft is accepted with probability beta."""
    if beta >= 1.0:
        return k + 1.0
    return (1.0 - beta ** (k + 1)) / (1.0 - beta)


def bucket(batch_size: int) -> int:
    """Batch sizes share cost estimates by power of two (1, 2, 4, 8, ...)."""
    return 1 << (batch_size - 1).bit_length()


@dataclass
class _Costs:
    """What steps cost at one batch-size bucket."""

    seconds: dict[int, float] = field(default_factory=dict)  # k -> moving average of a step's seconds
    steps: int = 0
    probes: int = 0
    current: int = 0  # the k chosen last


class SpeculationController:
    """Per step: how many tokens the memory drafts (0 = a plain step). Fed by the engine's measurements."""

    def __init__(self, max_k: int, adaptive: bool = True) -> None:
        self.max_k = max_k
        self.adaptive = adaptive
        self._costs: dict[int, _Costs] = {}
        self._accept: dict[str, tuple[float, float]] = {}  # memory -> decayed (passed, tests)

    def acceptance(self, memory: str) -> float:
        ok, n = self._accept.get(memory, (0.0, 0.0))
        return (ok + 2 * PRIOR_ACCEPTANCE) / (n + 2)

    def row_acceptance(self, memory: str, passed: float, tests: float) -> float:
        """A row's acceptance from its own (decayed) tests, starting from its memory's."""
        return (passed + PRIOR_WEIGHT * self.acceptance(memory)) / (tests + PRIOR_WEIGHT)

    def throughput(self, batch_size: int, betas: list[float], k: int) -> float | None:
        """Expected tokens per second of a step drafting k for rows with these acceptances
        (None: not measured)."""
        seconds = self._costs.get(bucket(batch_size), _Costs()).seconds.get(k)
        if seconds is None:
            return None
        tokens = sum(expected_tokens(b, k) for b in betas) + batch_size - len(betas)
        return tokens / seconds

    def choose(self, batch_size: int, betas: list[float]) -> int:
        """Drafts for this step's speculative rows (their acceptances, `row_acceptance`)."""
        if not self.adaptive:
            return self.max_k
        c = self._costs.setdefault(bucket(batch_size), _Costs())
        c.steps += 1
        choices = range(self.max_k, -1, -1)
        unmeasured = [k for k in choices if k not in c.seconds]
        if unmeasured:
            return unmeasured[0]
        rates = {k: self.throughput(batch_size, betas, k) or 0.0 for k in choices}
        best = max(rates, key=lambda k: rates[k])
        if rates[best] < SWITCH_GAIN * rates[c.current]:  # hysteresis: noise alone does not flip the choice
            best = c.current
        c.current = best
        if c.steps % PROBE_EVERY == 0:  # re-measure a neighbour of the choice, or a plain step, in turn
            others = sorted({best - 1, best + 1, 0} & set(choices) - {best})
            c.probes += 1
            return others[c.probes % len(others)]
        return best

    def lookahead(self, seqs: list[Sequence], reserve: Callable[[Sequence, int], bool]) -> list[int] | None:
        """Drafts per row for a speculative round (`reserve` takes their pages), or None for a plain step.

        A row drafts at most one token fewer than it may still emit (the round adds one of its own), and
        none when `reserve` refuses its drafts' pages (above the watermark): speculation never preempts.
        """
        betas = [
            self.row_acceptance(m, s.spec_passed, s.spec_tests)
            for s in seqs
            if s.speculative and (m := s.memory_name) is not None
        ]
        k = self.choose(len(seqs), betas) if betas else 0
        if not k:
            return None
        k_rows = []
        for seq in seqs:
            n = max(0, min(k, seq.max_len - len(seq.token_ids) - 1)) if seq.speculative else 0
            k_rows.append(n if n and reserve(seq, n) else 0)
        return k_rows if any(k_rows) else None

    def observe(self, batch_size: int, k: int, seconds: float) -> None:
        """A decode step with speculative rows drafted k tokens (0: plain) and took `seconds`."""
        c = self._costs.setdefault(bucket(batch_size), _Costs())
        old = c.seconds.get(k)
        if old is not None:
            # A step slowed by something else (another process, a collection) must not condemn its k until its
            # next probe: one observation moves the average by at most EMA × the average itself.
            seconds = min(seconds, 2.0 * old)
        c.seconds[k] = seconds if old is None else old + EMA * (seconds - old)

    def observe_acceptance(self, memory: str, tests: int, passed: int) -> None:
        ok, n = self._accept.get(memory, (0.0, 0.0))
        self._accept[memory] = (ACCEPT_DECAY * ok + passed, ACCEPT_DECAY * n + tests)

    def costs(self, batch_size: int) -> dict[int, float]:
        """Current estimates at this batch size, seconds per step by k (for benchmarks and logs)."""
        return dict(self._costs.get(bucket(batch_size), _Costs()).seconds)


# -- the round --------------------------------------------------------------------------------------------
# Above: the controller that chooses k. Below: one speculative round as the engine runs it (its forward, its
# mix on the device, its postprocessing).


@dataclass
class SpecCounts:
    """One memory's speculation in one step: drafts made and kept, acceptance tests run and passed."""

    drafted: int = 0
    accepted: int = 0
    tests: int = 0
    passed: int = 0

    def add(self, seq: Sequence, drafted: int, emitted: int, last_passed: bool) -> None:
        """A row that drafted `drafted` tokens and emitted `emitted`: every emitted position had a test
        (the last one's may have failed), every one before it kept its draft. The row keeps its own tally."""
        passed = emitted - 1 + int(last_passed)
        self.drafted += drafted
        self.accepted += emitted - 1
        self.tests += emitted
        self.passed += passed
        seq.spec_passed = ROW_DECAY * seq.spec_passed + passed
        seq.spec_tests = ROW_DECAY * seq.spec_tests + emitted


@dataclass(frozen=True)
class RoundResult:
    """What the host read back from a speculative round."""

    tokens: np.ndarray  # [B, T] the token at each position (a row emits its first `emitted` ones)
    emitted: np.ndarray  # [B] accepted drafts + 1
    last_accepted: np.ndarray  # [B] the acceptance test at the row's last emitted position passed
    logprobs: dict[tuple[int, int], TokenLogprob]  # (row, position) -> log-prob and top alternatives


class SpeculativeRound:
    """One round: each memory drafts k <= K tokens per row on the device, the base verifies them in one
    forward, and each row keeps its accepted prefix plus one token. Rows without a memory, at α = 0,
    opted out or with several memories decode as usual in the same round (k = 0). Still one host read
    (the engine's)."""

    is_prefill = False

    def __init__(self, runner: ModelRunner, mixer: Mixer, rows: RowBatch, plan: SpecPlan) -> None:
        self.runner, self.mixer, self.rows, self.plan = runner, mixer, rows, plan
        self.seqs = rows.seqs
        self.num_tokens = len(rows.seqs) * (plan.k + 1)
        self.counts: dict[str, SpecCounts] = {}  # filled by `postprocess`

    def forward(self) -> SpecLogits:
        return self.runner.speculate(self.rows, self.plan)  # a memory's failure is contained in `speculate`

    def mix(self, logits: SpecLogits) -> Readback:
        """Mix at every verified position, run each position's acceptance test and residual draw, and end
        each row's run at its first rejection (or its last draft). Names: tokens [B, T], emitted [B],
        last_accepted [B], and with log-probs chosen/top_v/top_i [W, T, ...]."""
        rows, plan = self.rows, self.plan
        b, t = len(rows.seqs), plan.k + 1
        base_lp = torch.log_softmax(logits.base.float(), dim=-1)  # [B, T, V]
        # [B, T, V] q̃ each draft came from
        q = torch.zeros_like(base_lp) if rows.sampling.any_sampled else None
        drafts = torch.zeros(b, t, dtype=torch.long, device=base_lp.device)  # [B, T]
        parts = []
        for g in rows.groups:
            # A row with several memories never drafts (k = 0): only position 0 of its groups' buffers
            # is real; routed rows never draft either.
            buf = logits.drafts[g.name]
            parts.append(group_part(g, base_lp, buf.logp, self.mixer.group_context(g)))
            drafts.index_copy_(0, g.rows_dev, buf.tokens)
            if q is not None and buf.probs is not None:
                q.index_copy_(0, g.rows_dev, buf.probs)
        # [B, 1, 1]
        log_base_weight = rows.log_base_weight.unsqueeze(-1) if rows.log_base_weight is not None else None
        logp = apply(base_lp, parts, log_base_weight)  # [B, T, V]
        pos = torch.arange(t, device=logp.device)  # [T]
        drafted = None  # [B, T] a draft at every position of every row: the common round, no mask needed
        if len(rows.spec_rows) < b or min(plan.k_rows) < plan.k:
            drafted = (rows.spec_mask[:, None] & (pos[None, :] <= plan.k_dev[:, None])).flatten()
        u = logits.uniforms.flatten(1) if logits.uniforms is not None else None  # [3, B * T]
        tokens, ok = accept(
            logp.flatten(0, 1), Drafts(drafts.flatten(), q.flatten(0, 1) if q is not None else None),
            drafted, rows.sampling.repeat(t), u,
        )
        tokens, ok = tokens.view(b, t), ok.view(b, t)
        # A row keeps its drafts up to the first rejected one, and the token drawn there
        # (or at its last draft).
        stop = ~ok | (pos[None, :] >= plan.k_dev[:, None])  # [B, T]
        emitted = (~stop).long().cumprod(dim=1).sum(dim=1) + 1  # [B]
        last = (emitted - 1).unsqueeze(1)  # [B, 1]
        self.runner.tokens.index_copy_(0, rows.slots_dev, tokens.gather(1, last).squeeze(1))  # the next input
        for g in rows.groups:  # a routed row emits one token, at position 0 (it does not draft)
            if g.name in logits.drafts:
                self.mixer.advance_context(g, tokens[:, 0], base_lp[:, 0], logits.drafts[g.name].logp[:, 0])
        out: Readback = {"tokens": tokens, "emitted": emitted, "last_accepted": ok.gather(1, last).squeeze(1)}
        if rows.logprob_rows:
            w = rows.logprob_rows_dev
            # [W, T, ...]
            out |= top_readback("", logp.index_select(0, w), tokens.index_select(0, w), rows.num_top)
        return out

    def result(self, host: Host) -> RoundResult:
        tok, emitted = host["tokens"], host["emitted"]
        logprobs = {
            (i, j): token_logprob(host, "", (w, j), int(tok[i, j]), self.rows.seqs[i].params.logprobs or 0)
            for w, i in enumerate(self.rows.logprob_rows)
            for j in range(int(emitted[i]))
        }
        return RoundResult(tok, emitted, host["last_accepted"], logprobs)

    def postprocess(self, logits: SpecLogits, host: Host) -> None:
        """Each row appends its run (cut short by a stop id, EOS or its length) and every cache it uses is
        set to what it now holds: the rejected drafts' positions are forgotten, their pages kept."""
        r = self.result(host)
        now = time.monotonic()
        for i, seq in enumerate(self.rows.seqs):
            if i in logits.failed:
                seq.finish(FinishReason.ERROR, error=logits.failed[i])
                continue
            n = int(r.emitted[i])
            if seq.speculative and seq.memory_name is not None:
                self.counts.setdefault(seq.memory_name, SpecCounts()).add(
                    seq, self.plan.k_rows[i], n, bool(r.last_accepted[i])
                )
            for j in range(n):
                seq.append(int(r.tokens[i, j]), r.logprobs.get((i, j)), now)
                if seq.is_finished:
                    break
            if not seq.is_finished:
                self.runner.caches.accepted(seq, len(seq.token_ids) - 1)  # its last token is the next input
