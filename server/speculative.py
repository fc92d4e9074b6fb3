"""When speculative mixing pays, and how many tokens the memory drafts per round.

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

from dataclasses import dataclass, field

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
        """Expected tokens per second of a step drafting k for rows with these acceptances (None: not measured)."""
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
