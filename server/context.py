"""Per-row state of routers with context features: the memory's advantage EMAs, carried on the device.

A router with context decays (`memories.router.RouterConfig.context_decays`) reads, at each position, moving
averages of log p_mem(y_s) − log p_base(y_s) over the tokens y_s before it. The engine keeps them per slot
and per memory ([slots, K] float64) and advances them with `memories.router.advantage_emas`, the same
recurrence the toolkit runs over a whole text:

- a prompt chunk: every position whose next token is known (all but the prompt's last) adds its target's
  log-probs of both models (`ModelRunner._prefill_model` keeps those positions' logits; the scheduler caps
  such chunks at `CONTEXT_CHUNK_TOKENS`); a chunk from position 0 starts from zero, so a re-admitted
  (preempted) row recomputes its state with its prompt and generated tokens, and a slot's previous occupant
  leaves nothing behind;
- each new token (decode step, prefill's first token, a speculative round's one token of a routed row, which
  never drafts): the whole batch's rows of the memory at once, on the device, no host sync.

Rows of these routers bypass the prefix cache (`Scheduler._lookup`): a cached prefix has no log-probs.
"""

from __future__ import annotations

import numpy as np
import torch

from memories.mixing import memory_logprobs
from memories.router import advantage_emas


class ContextState:
    """The EMAs [slots, K] of each (memory, decays) that context-routed rows use."""

    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.device = device
        self._state: dict[tuple[str, tuple[float, ...]], torch.Tensor] = {}

    def of(self, name: str, decays: tuple[float, ...]) -> torch.Tensor:
        """[S+1, K] float64 (the last row: the runner's scratch slot)."""
        key = (name, decays)
        if key not in self._state:
            self._state[key] = torch.zeros(self.num_slots + 1, len(decays), dtype=torch.float64,
                                           device=self.device)
        return self._state[key]

    def rows(self, name: str, decays: tuple[float, ...], slots_dev: torch.Tensor) -> torch.Tensor:
        """[b, K] the EMAs before the rows' next position."""
        return self.of(name, decays).index_select(0, slots_dev)

    def advance(self, name: str, decays: tuple[float, ...], slots_dev: torch.Tensor, base_t: torch.Tensor,
                mem_t: torch.Tensor) -> None:
        """Each row (slot) took one more token: base_t, mem_t [b] its log-prob under each model."""
        state = self.of(name, decays)
        _, new = advantage_emas((mem_t - base_t).unsqueeze(-1), decays, state.index_select(0, slots_dev))
        state.index_copy_(0, slots_dev, new)

    def prompt(self, name: str, decays: tuple[float, ...], slot: int, start: int, base_t: torch.Tensor,
               mem_t: torch.Tensor) -> None:
        """A prompt chunk from position `start` whose positions' targets have these log-probs [n] (n may be
        0)."""
        state = self.of(name, decays)
        if start == 0:
            state[slot] = 0.0
        if len(base_t):
            state[slot] = advantage_emas(mem_t - base_t, decays, state[slot])[1]


def target_logprobs(base_logits: torch.Tensor, mem_logits: torch.Tensor, temperature: float,
                    targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, memory) log-probs [n] of `targets` [n] from logits [≥n, V] (the memory's at its temperature)."""
    n = len(targets)
    base_t = torch.log_softmax(base_logits[:n].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mem_t = memory_logprobs(mem_logits[:n], temperature).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return base_t, mem_t


def prompt_targets(token_ids: list[int], start: int, end: int) -> np.ndarray:
    """The next tokens of positions [start, end) that have one (a prompt's last position does not yet)."""
    return np.asarray(token_ids[start + 1 : min(end, len(token_ids) - 1) + 1], dtype=np.int64)
