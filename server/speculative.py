"""When speculative mixing pays, and how many tokens the memory drafts per round.

A round costs the memory's serial draft steps plus one verify forward of the base over k + 1 tokens per
row; it emits, per drafting row, E(β, k) = (1 − β^(k+1)) / (1 − β) tokens in expectation, where β is the
memory's per-token acceptance (≥ α for the untransformed mixture). A plain step emits one token per row.
Whether and how far to draft therefore depends on β (per memory) and on what a draft step, the rest of
a round and a plain step cost at this batch size — all measured by the engine as it runs:

    k* = argmax over k in 1..K of   (n_spec · E(β, k) + n_plain) / (rest + k · draft)
    speculate with k*  if that beats  (n_spec + n_plain) / plain

with `draft` the seconds of one draft step, `rest` a round's seconds outside its serial drafts (verify,
the overlapped last memory step, accept, host work) and `plain` a plain step's seconds, each an
exponential moving average per batch-size bucket (powers of two). Costs are re-measured all the time:
every PROBE_EVERY-th step of a bucket takes the other choice. Acceptance is measured on every step,
plain ones included (a plain step draws a speculative row's token by the same accept/residual rule,
so its acceptance test happens anyway). Large batches turn speculation off by themselves: there the
base's verify of k + 1 tokens per row is compute-bound and `rest` grows past what E(β, k) repays.

Choices only change speed, never tokens: a speculative row's token at each position is a function of
that position's random numbers and distributions (see `server.sampler`), whatever k produced it.
"""

from __future__ import annotations

from dataclasses import dataclass

EMA = 0.2  # weight of a new timing in its moving average
PROBE_EVERY = 16  # a bucket tries the other choice (speculate or not) every this many steps
ACCEPT_DECAY = 0.95  # per observation: acceptance counts forget old text within ~20 steps
PRIOR_ACCEPTANCE = 0.7  # until a memory has been measured (weight: 2 tests)


def expected_tokens(beta: float, k: int) -> float:
    """Tokens a round of k drafts emits when each draft is accepted with probability beta."""
    if beta >= 1.0:
        return k + 1.0
    return (1.0 - beta ** (k + 1)) / (1.0 - beta)


def best_k(betas: list[float], num_plain: int, max_k: int, rest: float, draft: float) -> tuple[int, float]:
    """(k, tokens per second) maximising the round's throughput over k in 1..max_k, for drafting rows with
    acceptances `betas` and `num_plain` rows that get one token either way."""
    best = (1, 0.0)
    for k in range(1, max_k + 1):
        rate = (sum(expected_tokens(b, k) for b in betas) + num_plain) / (rest + k * draft)
        if rate > best[1]:
            best = (k, rate)
    return best


def bucket(batch_size: int) -> int:
    """Batch sizes share cost estimates by power of two (1, 2, 4, 8, ...)."""
    return 1 << (batch_size - 1).bit_length()


def _ema(old: float | None, new: float) -> float:
    return new if old is None else old + EMA * (new - old)


@dataclass
class _Costs:
    """Seconds measured at one batch-size bucket."""

    plain: float | None = None  # a plain decode step of a batch with speculative rows
    rest: float | None = None  # a round outside its serial draft steps
    draft: float | None = None  # one serial draft step (every memory of the batch)
    steps: int = 0


class SpeculationController:
    """Per step: how many tokens the memory drafts (0 = a plain step). Fed by the engine's measurements."""

    def __init__(self, max_k: int, adaptive: bool = True) -> None:
        self.max_k = max_k
        self.adaptive = adaptive
        self._costs: dict[int, _Costs] = {}
        self._accept: dict[str, tuple[float, float]] = {}  # memory -> decayed (accepted, tests)

    def acceptance(self, memory: str) -> float:
        ok, n = self._accept.get(memory, (0.0, 0.0))
        return (ok + 2 * PRIOR_ACCEPTANCE) / (n + 2)

    def choose(self, batch_size: int, memories: list[str]) -> int:
        """Drafts for this step's speculative rows (one memory name per such row)."""
        if not self.adaptive:
            return self.max_k
        c = self._costs.setdefault(bucket(batch_size), _Costs())
        c.steps += 1
        if c.rest is None or c.draft is None:
            return self.max_k  # measure a round first
        if c.plain is None:
            return 0  # then a plain step
        k, rate = best_k([self.acceptance(m) for m in memories], batch_size - len(memories), self.max_k, c.rest, c.draft)
        speculate = rate > batch_size / c.plain
        if c.steps % PROBE_EVERY == 0:  # keep the estimate of the choice not taken fresh
            speculate = not speculate
        return k if speculate else 0

    def observe_plain(self, batch_size: int, seconds: float) -> None:
        c = self._costs.setdefault(bucket(batch_size), _Costs())
        c.plain = _ema(c.plain, seconds)

    def observe_round(self, batch_size: int, k: int, seconds: float, draft_seconds: float) -> None:
        c = self._costs.setdefault(bucket(batch_size), _Costs())
        c.draft = _ema(c.draft, draft_seconds / k)
        c.rest = _ema(c.rest, max(seconds - draft_seconds, 0.0))

    def observe_acceptance(self, memory: str, tests: int, accepted: int) -> None:
        ok, n = self._accept.get(memory, (0.0, 0.0))
        self._accept[memory] = (ACCEPT_DECAY * ok + accepted, ACCEPT_DECAY * n + tests)

    def costs(self, batch_size: int) -> dict[str, float | None]:
        """The current estimates at this batch size (for benchmarks and logs)."""
        c = self._costs.get(bucket(batch_size), _Costs())
        return {"plain": c.plain, "rest": c.rest, "draft": c.draft}
