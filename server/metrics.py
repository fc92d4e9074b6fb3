"""Prometheus metric definitions for memdec: one `Metrics` object per app, on its own registry.

Every metric lives in the `memdec_` namespace and is named after its vLLM counterpart, so dashboards
written for vLLM translate by a prefix. The engine and the API call the small typed methods below; they
never touch a prometheus_client object themselves, which keeps label values bounded in one place.

Labels and cardinality
    `memory` is a registered memory name, `none` for the base model alone, or `other` for anything
    else (a name never registered, or one past `max_memory_labels` distinct names). Names stay valid
    after their memory is unloaded so that requests still in flight keep their label. `none` and
    `other` are therefore reserved: a memory so named is served, but its latencies count as `other`.
    `endpoint`, `status`, `finish_reason`, `result` and `phase` come from the fixed sets below
    (unknown endpoint or finish reason -> `other`).

Buckets (seconds; a 1-2.5-5 series per decade, so a p99 read off a bucket is within a factor 2-2.5)
    STEP_BUCKETS, 50 us .. 5 s: `memdec_step_phase_seconds` and `memdec_inter_token_latency_seconds`.
        On a GPU a decode step of a 7B base is a few to tens of ms, and its phases (schedule,
        mix_sample, a small memory's forward) are tens of us to a few ms; on the CPU with a small model
        steps take tens to hundreds of ms. Both ends fall in distinct buckets.
    REQUEST_BUCKETS, 0.5 ms .. 10 min: time to first token, queue, prefill, decode, end-to-end and
        perplexity requests. A GPU TTFT is ms to hundreds of ms, a CPU one tens of ms to seconds; a
        long generation or a queue under overload takes minutes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

NAMESPACE = "memdec"
NONE = "none"  # the base model alone; also finish_reason where nothing was generated
OTHER = "other"
RESERVED_MEMORY_LABELS = frozenset({NONE, OTHER})
MEMORY = ("memory",)  # the label of every per-memory series

STEP_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip  # the 1-2.5-5 series in rows, not a value per line
REQUEST_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 600.0,
)  # fmt: skip  # the 1-2.5-5 series in rows, not a value per line

PHASES: tuple[str, ...] = ("schedule", "base_forward", "memory_forward", "mix_sample")
ENDPOINTS: tuple[str, ...] = ("completions", "chat", "perplexity", "models", "memories")
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error")  # server.request.FinishReason values
LOAD_RESULTS: tuple[str, ...] = ("success", "invalid", "error")  # invalid = refused input, error = failure
PREFIX_CACHES: tuple[str, ...] = ("base", "memory")  # whose KV cache a prefix lookup searched

# Full names as defined; histograms expose _bucket/_sum/_count, counters _total. The `_created` samples
# prometheus_client adds are left out of the exposition: in the text format each would be one more gauge
# series per label set, which Prometheus does not need (it detects counter resets by itself).
HISTOGRAMS: tuple[str, ...] = (
    "memdec_time_to_first_token_seconds",
    "memdec_inter_token_latency_seconds",
    "memdec_e2e_request_latency_seconds",
    "memdec_request_queue_time_seconds",
    "memdec_request_prefill_time_seconds",
    "memdec_request_decode_time_seconds",
    "memdec_step_phase_seconds",
    "memdec_perplexity_request_seconds",
)
COUNTERS: tuple[str, ...] = (
    "memdec_prompt_tokens_total",
    "memdec_generation_tokens_total",
    "memdec_requests_total",
    "memdec_memory_loads_total",
    "memdec_num_preemptions_total",
    "memdec_spec_draft_tokens_total",
    "memdec_spec_accepted_tokens_total",
    "memdec_prefix_cache_queries_total",
    "memdec_prefix_cache_hits_total",
    "memdec_auto_memory_choices_total",
)
GAUGES: tuple[str, ...] = (
    "memdec_requests_running",
    "memdec_requests_waiting",
    "memdec_memories_loaded",
    "memdec_memory_parameters",
    "memdec_batch_size",
    "memdec_kv_cache_usage_perc",
    "memdec_cuda_graph_capture_seconds",
    "memdec_tensor_parallel_size",
)


def exposed_series_names() -> frozenset[str]:
    """Every sample name `render()` can emit: what a PromQL expression may refer to."""
    names = set(GAUGES)
    for h in HISTOGRAMS:
        names |= {h + s for s in ("_bucket", "_sum", "_count")}
    return frozenset(names | set(COUNTERS))


class _WithoutCreated:
    """A collector view of a registry that drops the `_created` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():  # fresh Metric objects on every collect
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class Metrics:
    """memdec's metrics on a private CollectorRegistry: several apps or tests in one process never collide."""

    def __init__(self, *, max_memory_labels: int = 64, registry: CollectorRegistry | None = None) -> None:
        if max_memory_labels < 0:
            raise ValueError("max_memory_labels must be >= 0")
        self.registry = registry if registry is not None else CollectorRegistry()
        self._max_memory_labels = max_memory_labels
        self._lock = threading.Lock()
        self._memory_labels: set[str] = set()  # every name ever registered (capped): valid label values
        self._loaded: set[str] = set()
        # Each group of definitions reads as a table: name, help, labels (and buckets).
        self._define_latencies()
        self._define_counters()
        self._define_gauges()
        # Series that exist from the start, so dashboards show 0 rather than "no data".
        for phase in PHASES:
            self.step_phase.labels(phase)
        for result in LOAD_RESULTS:
            self.memory_loads.labels(result)
        for cache in PREFIX_CACHES:
            self.prefix_cache_queries.labels(cache)
            self.prefix_cache_hits.labels(cache)
        self._init_memory_series(NONE)

    def _hist(self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> Histogram:
        return Histogram(name, doc, labels, namespace=NAMESPACE, registry=self.registry, buckets=buckets)

    def _counter(self, name: str, doc: str, labels: Sequence[str]) -> Counter:
        return Counter(name, doc, labels, namespace=NAMESPACE, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, doc, labels, namespace=NAMESPACE, registry=self.registry)

    def _define_latencies(self) -> None:
        hist, mem = self._hist, MEMORY
        self.time_to_first_token = hist(
            "time_to_first_token_seconds", "Arrival to first generated token.", mem, REQUEST_BUCKETS
        )
        self.inter_token_latency = hist(
            "inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
            mem,
            STEP_BUCKETS,
        )
        self.e2e_request_latency = hist(
            "e2e_request_latency_seconds", "Arrival to the request's last output.", mem, REQUEST_BUCKETS
        )
        self.request_queue_time = hist(
            "request_queue_time_seconds",
            "Arrival to first scheduled (time spent waiting).",
            mem,
            REQUEST_BUCKETS,
        )
        self.request_prefill_time = hist(
            "request_prefill_time_seconds", "First scheduled to first generated token.", mem, REQUEST_BUCKETS
        )
        self.request_decode_time = hist(
            "request_decode_time_seconds", "First generated token to the last one.", mem, REQUEST_BUCKETS
        )
        self.step_phase = hist(
            "step_phase_seconds", "Time of each phase of one engine step.", ("phase",), STEP_BUCKETS
        )
        self.perplexity_request = hist(
            "perplexity_request_seconds", "Time to score one /v1/perplexity request.", mem, REQUEST_BUCKETS
        )

    def _define_counters(self) -> None:
        counter, mem = self._counter, MEMORY
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens processed.", mem)
        self.generation_tokens = counter("generation_tokens_total", "Tokens generated.", mem)
        self.requests = counter(
            "requests_total",
            "Requests answered, by endpoint, HTTP status and finish reason.",
            ("endpoint", "status", "finish_reason"),
        )
        self.memory_loads = counter(
            "memory_loads_total", "Attempts to load a memory, by result.", ("result",)
        )
        self.num_preemptions = counter(
            "num_preemptions",
            "Sequences preempted (pages freed, recomputed later) when the KV cache ran out.",
            (),
        )
        self.spec_draft_tokens = counter(
            "spec_draft_tokens_total",
            "Tokens a memory drafted for the base to verify (speculative mixing).",
            mem,
        )
        self.spec_accepted_tokens = counter(
            "spec_accepted_tokens_total", "Drafted tokens the base's verify kept (speculative mixing).", mem
        )
        self.prefix_cache_queries = counter(
            "prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache, by cache (base or memory).",
            ("cache",),
        )
        self.prefix_cache_hits = counter(
            "prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache (not recomputed), by cache.",
            ("cache",),
        )
        self.auto_memory_choices = counter(
            "auto_memory_choices",
            'Memories chosen for `"memory": "auto"` requests (`none`: the base alone).',
            mem,
        )

    def _define_gauges(self) -> None:
        gauge = self._gauge
        self.requests_running = gauge("requests_running", "Requests in the running batch.")
        self.requests_waiting = gauge("requests_waiting", "Requests queued, waiting to be scheduled.")
        self.memories_loaded = gauge("memories_loaded", "Memories loaded and servable.")
        self.memory_parameters = gauge("memory_parameters", "Parameters of each loaded memory.", MEMORY)
        self.batch_size = gauge("batch_size", "Sequences in the last engine step.")
        self.kv_cache_usage = gauge(
            "kv_cache_usage_perc",
            "Fraction of the KV cache's pages in use (base and memories share them), 0 to 1.",
        )
        self.graph_capture = gauge(
            "cuda_graph_capture_seconds",
            "Time to capture a model's decode CUDA graphs (0 when eager).",
            MEMORY,
        )
        self.tensor_parallel_size = gauge(
            "tensor_parallel_size",
            "Processes (GPUs) the base is sharded over. "
            "Rank 0 serves every metric for all of them: one server, one target.",
        )
        self.tensor_parallel_size.set(1)

    # -- label bounding ------------------------------------------------------------------------------

    def memory_label(self, memory: str | None) -> str:
        """The label value for a request's memory: its name if registered, `none` without one, else
        `other`."""
        if memory is None:
            return NONE
        with self._lock:
            return memory if memory in self._memory_labels else OTHER

    def _init_memory_series(self, label: str) -> None:
        latencies = (
            self.time_to_first_token,
            self.inter_token_latency,
            self.e2e_request_latency,
            self.request_queue_time,
            self.request_prefill_time,
            self.request_decode_time,
            self.perplexity_request,
        )
        for h in latencies:
            h.labels(label)
        self.prompt_tokens.labels(label)
        self.generation_tokens.labels(label)
        self.auto_memory_choices.labels(label)
        if label != NONE:  # the base alone never drafts
            self.spec_draft_tokens.labels(label)
            self.spec_accepted_tokens.labels(label)

    # -- memories -----------------------------------------------------------------------------------

    def memory_loaded(self, name: str, parameters: int) -> None:
        """A memory became servable (at start-up or hot-loaded)."""
        reserved = name in RESERVED_MEMORY_LABELS
        if reserved:  # the registry should refuse such names; here they only must not corrupt a series
            message = "memory name %r is a reserved metrics label: its latencies are counted as %r"
            log.warning(message, name, OTHER)
        with self._lock:
            self._loaded.add(name)
            room = len(self._memory_labels) < self._max_memory_labels
            new_label = not reserved and name not in self._memory_labels and room
            if new_label:
                self._memory_labels.add(name)
            n_loaded = len(self._loaded)
        if new_label:
            self._init_memory_series(name)
        self.memory_parameters.labels(name).set(parameters)
        self.memories_loaded.set(n_loaded)

    def memory_unloaded(self, name: str) -> None:
        """A memory was removed. Its latency series stay (requests in flight may still finish with it)."""
        with self._lock:
            self._loaded.discard(name)
            n_loaded = len(self._loaded)
        self.memory_parameters.remove(name)  # no-op when absent
        self.graph_capture.remove(name)
        self.memories_loaded.set(n_loaded)

    def memory_load_result(self, result: str) -> None:
        """Count one load attempt: `success`, `invalid` (bad directory, manifest or tokenizer) or `error`."""
        if result not in LOAD_RESULTS:
            raise ValueError(f"result must be one of {LOAD_RESULTS}, got {result!r}")
        self.memory_loads.labels(result).inc()

    # -- engine ------------------------------------------------------------------------------------

    def set_queue(self, running: int, waiting: int) -> None:
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)

    def observe_step(self, phases: Mapping[str, float], batch_size: int) -> None:
        """One engine step: seconds per phase (any subset of PHASES) and the number of sequences in it."""
        unknown = set(phases) - set(PHASES)
        if unknown:
            raise ValueError(f"unknown step phases {sorted(unknown)}; expected a subset of {PHASES}")
        for phase, seconds in phases.items():
            self.step_phase.labels(phase).observe(seconds)
        self.batch_size.set(batch_size)

    def set_kv_cache(self, usage: float, preemptions: int = 0) -> None:
        """After an engine step: the KV cache's fill and the sequences that step preempted."""
        self.kv_cache_usage.set(usage)
        if preemptions:
            self.num_preemptions.inc(preemptions)

    def graph_captured(self, memory: str | None, seconds: float) -> None:
        """A model's decode graphs were captured: the base (`none`) or a memory, just before it is served
        (so its name may not be a label yet: it gets one if `memory_loaded` will give it one)."""
        label = NONE
        if memory is not None:
            with self._lock:
                fits = memory in self._memory_labels or len(self._memory_labels) < self._max_memory_labels
            label = memory if fits and memory not in RESERVED_MEMORY_LABELS else OTHER
        self.graph_capture.labels(label).set(seconds)

    def observe_speculation(self, memory: str, drafted: int, accepted: int) -> None:
        """One engine step's speculative rounds of one memory: tokens drafted, and those kept."""
        label = self.memory_label(memory)
        self.spec_draft_tokens.labels(label).inc(drafted)
        self.spec_accepted_tokens.labels(label).inc(accepted)

    def observe_prefix_cache(self, cache: str, queries: int, hits: int) -> None:
        """One admission's prefix-cache lookup in one model's cache: prompt tokens looked up, and found."""
        if cache not in PREFIX_CACHES:
            raise ValueError(f"cache must be one of {PREFIX_CACHES}, got {cache!r}")
        self.prefix_cache_queries.labels(cache).inc(queries)
        if hits:
            self.prefix_cache_hits.labels(cache).inc(hits)

    def observe_request_finished(
        self,
        memory: str | None,
        *,
        queue_s: float,
        e2e_s: float,
        ttft_s: float | None = None,
        prefill_s: float | None = None,
        decode_s: float | None = None,
        itl: Iterable[float] = (),
        prompt_tokens: int = 0,
        generation_tokens: int = 0,
    ) -> None:
        """A generation request finished (aborted ones included). Times that never happened (no first
        token) are None and not observed; tokens are counted here, once per request."""
        label = self.memory_label(memory)
        self.request_queue_time.labels(label).observe(queue_s)
        self.e2e_request_latency.labels(label).observe(e2e_s)
        if ttft_s is not None:
            self.time_to_first_token.labels(label).observe(ttft_s)
        if prefill_s is not None:
            self.request_prefill_time.labels(label).observe(prefill_s)
        if decode_s is not None:
            self.request_decode_time.labels(label).observe(decode_s)
        itl_hist = self.inter_token_latency.labels(label)
        for gap in itl:
            itl_hist.observe(gap)
        if prompt_tokens:
            self.prompt_tokens.labels(label).inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.labels(label).inc(generation_tokens)

    def auto_memory_chosen(self, memory: str | None) -> None:
        """A `"memory": "auto"` request chose `memory` (None: the base alone)."""
        self.auto_memory_choices.labels(self.memory_label(memory)).inc()

    def observe_perplexity(self, memory: str | None, seconds: float, tokens: int = 0) -> None:
        """A /v1/perplexity request was scored; its tokens count as prompt tokens of that memory."""
        label = self.memory_label(memory)
        self.perplexity_request.labels(label).observe(seconds)
        if tokens:
            self.prompt_tokens.labels(label).inc(tokens)

    # -- API ---------------------------------------------------------------------------------------

    def request_done(self, endpoint: str, status: int, finish_reason: str | None = None) -> None:
        """One HTTP request answered. `endpoint` is a name of ENDPOINTS or its path (`/v1/completions`);
        `finish_reason` is None where nothing was generated."""
        if not 100 <= int(status) <= 599:
            raise ValueError(f"status must be an HTTP status code, got {status!r}")
        name = endpoint.removeprefix("/v1/").split("/", 1)[0]  # "/v1/memories/x" and "memories" alike
        ep = name if name in ENDPOINTS else OTHER
        reason = getattr(finish_reason, "value", finish_reason)  # accepts server.request.FinishReason
        fr = NONE if reason is None else (reason if reason in FINISH_REASONS else OTHER)
        self.requests.labels(ep, str(int(status)), fr).inc()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type, negotiated from an Accept header (Prometheus text
        format 0.0.4 by default, OpenMetrics when the scraper asks for it)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(_WithoutCreated(self.registry)), content_type
