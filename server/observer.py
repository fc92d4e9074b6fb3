"""Feeds engine events into the Prometheus metrics (the engine itself knows nothing of Prometheus)."""

from __future__ import annotations

from server.engine import StepStats
from server.metrics import Metrics
from server.sequence import Sequence


class MetricsObserver:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_step(self, stats: StepStats) -> None:
        self.metrics.observe_step(stats.phases, stats.batch_size)

    def on_queue(self, running: int, waiting: int) -> None:
        self.metrics.set_queue(running, waiting)

    def on_kv_cache(self, usage: float, preemptions: int) -> None:
        self.metrics.set_kv_cache(usage, preemptions)

    def on_graph_capture(self, model: str | None, seconds: float) -> None:
        self.metrics.graph_captured(model, seconds)

    def on_speculation(self, memory: str, drafted: int, accepted: int) -> None:
        self.metrics.observe_speculation(memory, drafted, accepted)

    def on_prefix_cache(self, cache: str, queries: int, hits: int) -> None:
        self.metrics.observe_prefix_cache(cache, queries, hits)

    def on_request_finished(self, seq: Sequence) -> None:
        t = seq.timings
        finished = t.finished if t.finished is not None else t.arrival
        # The memories actually mixed (α > 0, or routed: `"alpha": "auto"` mixes its memory at every token).
        # Several: a name no memory can have ('+' is not allowed), so the label is `other` (bounded).
        names = [t.memory for t in seq.request.mixture.active]
        memory = "+".join(names) if names else None
        self.metrics.observe_request_finished(
            memory,
            queue_s=(t.scheduled if t.scheduled is not None else finished) - t.arrival,
            e2e_s=finished - t.arrival,
            ttft_s=t.first_token - t.arrival if t.first_token is not None else None,
            prefill_s=(t.first_token - t.scheduled if t.first_token is not None and t.scheduled is not None
                       else None),
            decode_s=(t.last_token - t.first_token if t.first_token is not None and t.last_token is not None
                      else None),
            itl=t.inter_token,
            prompt_tokens=seq.num_prompt_tokens if t.scheduled is not None else 0,
            generation_tokens=seq.num_output_tokens,
        )
