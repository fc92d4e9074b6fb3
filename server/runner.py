"""Forwards of the base and the memories over one shared paged KV cache.

On CUDA the base runs on the current stream and the memories on a side stream, so the two overlap;
the side stream starts after everything the step uploaded (`side.wait_stream(main)`) and the main
stream waits for it before mixing, in a `finally` so an exception cannot leave the streams unjoined.
Everything a memory touches is persistent (pages, tables, graph buffers) or allocated on the side
stream itself; its logits are handed to the main stream with `record_stream`.

Failures are contained per model: a memory that raises fails only the rows that use it, and leaves
the cache consistent (a half-written step is never counted in a row's length).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np
import torch

from memories.mixing import memory_logprobs
from memories.perplexity import Window, batch_distributions, batch_logprobs
from memories.router import Router
from server.attention import PrefillContext, SingleTokens, use_paged_attention
from server.config import EngineConfig
from server.errors import forward_failed
from server.graphs import DecodeGraphs, VerifyGraphs
from server.kv import SCRATCH_PAGE, KVGeometry, ModelKV, PagePool, SequenceKV, page_bytes_for
from server.loader import LoadedModel
from server.sampler import DRAFT, SamplingRows, propose, sampling_rows, speculative_uniforms
from server.scheduler import PrefillChunk
from server.sequence import MemoryUse, Sequence
from server.tp import ShardedBase, Unsharded
from server.transfer import Uploader

log = logging.getLogger(__name__)

ModelKey = str | None  # None = the base; a memory by its registry name
T = TypeVar("T")


class _Timer:
    """Wall clock on CPU; CUDA events on GPU, read only after the step's own synchronisation."""

    def __init__(self, device: torch.device, stream: torch.cuda.Stream | None = None) -> None:
        self.cuda = device.type == "cuda"
        self.stream = stream
        self.total = 0.0
        self._pairs: list = []

    def __enter__(self) -> _Timer:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record(self.stream)
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(self.stream)
            self._pairs.append((self._start, end))
        else:
            self.total += time.perf_counter() - self._t0

    def seconds(self) -> float:
        return self.total + sum(s.elapsed_time(e) for s, e in self._pairs) / 1000.0


@dataclass
class ModelState:
    lm: LoadedModel
    kv: ModelKV
    graphs: DecodeGraphs
    verify: VerifyGraphs | None = None  # the base's, when the engine speculates
    capture_seconds: float = 0.0


@dataclass(frozen=True)
class MemoryGroup:
    """The rows of one batch that use one memory."""

    name: str
    rows: list[int]  # indices into the batch
    rows_dev: torch.Tensor  # [b]
    slots: list[int]
    slots_dev: torch.Tensor  # [b]
    alpha: torch.Tensor  # [b] float32
    log_alpha: torch.Tensor  # [b, 1] log α, computed once per batch
    temperature: torch.Tensor | None  # [b, 1] memory temperature per row; None when every row's is 1
    whole_batch: bool  # every row of the batch, in order: mixing needs no gather or scatter
    # `"alpha": "auto"` rows: the memory's router (None when no row of the group uses it) and which rows do
    # ([b, 1] bool; None when all of them do, so mixing needs no select).
    router: Router | None = None
    routed: torch.Tensor | None = None


@dataclass(frozen=True)
class RowBatch:
    """A batch of sequences as the device sees it: built on the host once, uploaded without a sync.

    A decode batch is rebuilt only when its membership changes; a steady decode step reuses it.
    """

    seqs: list[Sequence]
    slots: list[int]
    slots_dev: torch.Tensor  # [B]
    groups: list[MemoryGroup]  # one per memory in use; a row with several memories is in several groups
    # [B, 1] log of each row's base weight 1 − Σ αᵢ (0 without a memory, −inf when the memories take it all);
    # None when no row uses a memory. Mixing adds it to the base's log-probs, then logaddexp's each memory's
    # log αᵢ + log pᵢ into its group's rows: p = Σ αᵢ·pᵢ + (1 − Σ αᵢ)·p_base.
    log_base_weight: torch.Tensor | None
    # [m] slots of the rows with several memories (None: no such row). They never draft, but each of their
    # memories runs the first step of a speculative round on the slot's last token, which must stay put.
    multi_slots_dev: torch.Tensor | None
    sampling: SamplingRows
    logprob_rows: list[int]  # rows that asked for log-probs
    logprob_rows_dev: torch.Tensor  # [W]
    num_top: int  # top alternatives to return (max over those rows)
    spec_rows: list[int]  # rows whose memory drafts for the base (when the engine speculates)
    spec_mask: torch.Tensor  # [B] bool


@dataclass(frozen=True)
class DraftStep:
    """The rows of one memory group that run draft step i of a round (those drafting at least i − 1
    tokens)."""

    rows: torch.Tensor  # [b_i] indices into the group's rows
    batch_rows: torch.Tensor  # [b_i] indices into the batch
    slots: list[int]
    slots_dev: torch.Tensor  # [b_i]
    whole_group: bool


@dataclass(frozen=True)
class SpecPlan:
    """One speculative round: how many tokens each row drafts, and which rows run each draft step."""

    k: int  # draft steps before the verify (the most any row drafts); the memory runs k + 1 steps
    k_rows: list[int]  # [B] tokens each row drafts (0: the row gets one token, as in a plain step)
    k_dev: torch.Tensor  # [B]
    steps: dict[str, list[DraftStep]]  # memory -> its steps 1 .. k + 1


@dataclass
class DraftBuffers:
    """What a memory group's draft steps produced, per row and position j (step j + 1)."""

    logp: torch.Tensor  # [b, T, V] memory log-probs q (0 where a row did not run that step)
    probs: torch.Tensor | None  # [b, T, V] transformed q̃ the draft was drawn from (None: all rows greedy)
    tokens: torch.Tensor  # [b, T] drafts (position j's draft is the token proposed for position j)

    def put(
        self, step: DraftStep, j: int, logp: torch.Tensor, tokens: torch.Tensor, probs: torch.Tensor | None
    ) -> None:
        for buf, val in ((self.logp, logp), (self.tokens, tokens), (self.probs, probs)):
            if buf is None or val is None:
                continue
            if step.whole_group:
                buf[:, j] = val
            else:
                buf.select(1, j).index_copy_(0, step.rows, val)


@dataclass
class _Drafting:
    """A round's drafting state: what each memory group drafted so far, and which groups failed."""

    batch: RowBatch
    plan: SpecPlan
    uniforms: torch.Tensor | None  # [3, B, T]
    drafts: dict[str, DraftBuffers]
    # [m] the last tokens of the rows with several memories (`multi_slots_dev`)
    multi_inputs: torch.Tensor | None
    failed: dict[int, str] = field(default_factory=dict)  # batch row -> error
    failed_groups: set[str] = field(default_factory=set)

    def fail(self, g: MemoryGroup, exc: Exception) -> None:
        """A draft step of g raised: its rows fail, and its later steps do not run."""
        _fail_rows(self.failed, g.rows, exc)
        self.failed_groups.add(g.name)


@dataclass
class SpecLogits:
    """A speculative round's forwards: the base's verify logits and each memory's drafts."""

    base: torch.Tensor  # [B, T, V] verify logits, T = k + 1
    drafts: dict[str, DraftBuffers]  # memory -> its group's drafts, rows in the group's order
    # [3, B, T] the round's random numbers (`speculative_uniforms`); None if all greedy
    uniforms: torch.Tensor | None
    failed: dict[int, str]
    timers: tuple[_Timer, _Timer, _Timer]  # verify, serial drafts (steps 1..k), the last draft step

    def forward_seconds(self) -> dict[str, float]:
        """Per-phase device time (after the step's host sync on CUDA): verify as the base's forward, drafts
        as the memory's."""
        return {
            "base_forward": self.timers[0].seconds(),
            "memory_forward": self.timers[1].seconds() + self.timers[2].seconds(),
        }


@dataclass
class StepLogits:
    base: torch.Tensor  # [B, V] last-position logits, cut to the vocabulary
    memories: dict[str, torch.Tensor]  # memory -> [b, V], rows in its group's order
    prompt: dict[int, dict[ModelKey, torch.Tensor]]  # echo row -> model -> [T, V] logits over its prompt
    failed: dict[int, str]  # batch row -> error message
    timers: tuple[_Timer, _Timer]  # base, memories
    # seq_id of a failed non-final prompt chunk -> error
    failed_chunks: dict[int, str] = field(default_factory=dict)
    # Context-routed prompt chunks: seq_id -> model -> [n, V] logits at each of the chunk's positions (the
    # engine reduces them at once to the targets' log-probs for the row's advantage EMAs;
    # CONTEXT_CHUNK_TOKENS at most).
    scored: dict[int, dict[ModelKey, torch.Tensor]] = field(default_factory=dict)

    def forward_seconds(self) -> dict[str, float]:
        """Per-phase device time; on CUDA call it only after the step's host sync (events are done)."""
        return {"base_forward": self.timers[0].seconds(), "memory_forward": self.timers[1].seconds()}


@dataclass(frozen=True)
class PrefillInputs:
    """One packed prefill forward as host arrays (`PrefillContext`'s fields before upload). Under tensor
    parallelism rank 0 sends exactly this to the other ranks, which run the same forward on their heads."""

    ids: np.ndarray  # [N] token ids, packed
    pos: np.ndarray  # [N] positions
    pages: np.ndarray  # [N] page receiving each token's keys/values
    segments: list[tuple[int, int]]  # (start, length) per chunk in the packed row
    cached: list[int]  # per segment: tokens already cached before it
    context: list[np.ndarray | None]  # per segment continuing a cache (not a single): its block table
    singles: tuple[frozenset[int], np.ndarray, np.ndarray, np.ndarray] | None  # `SingleTokens`' fields
    keep: np.ndarray  # [K] packed positions whose logits are kept


class PrefillOutput(NamedTuple):
    """One model's prefill forward: what the engine keeps of its logits."""

    # [b, V] the last position of each final chunk, in chunk order (None: no chunk ended)
    last: torch.Tensor | None
    prompt: dict[int, torch.Tensor]  # echo row -> [T, V] at every prompt position (an echo prompt runs whole)
    scored: dict[int, torch.Tensor]  # seq_id of a context-routed chunk -> [n, V] at each of its positions


@dataclass
class PackedPrefill:
    """One model's prefill, packed (`ModelRunner._pack_prefill`): its inputs, and which positions' logits
    are kept."""

    key: ModelKey
    inputs: PrefillInputs | None = None
    keep: list[int] = field(default_factory=list)  # packed positions whose logits are kept
    last: list[int] = field(default_factory=list)  # index into `keep` of each final chunk's last position
    # echo row -> (first index into `keep`, count)
    echo: dict[int, tuple[int, int]] = field(default_factory=dict)
    # seq_id -> (first index into `keep`, count)
    scored: dict[int, tuple[int, int]] = field(default_factory=dict)

    def keep_positions(self, c: PrefillChunk, row: int | None, key: ModelKey, start: int, n: int) -> None:
        """Which of chunk c's n packed positions (from `start`) keep their logits: every one for a
        context-routed chunk (its targets' log-probs feed the EMAs) and an echo prompt, else a final chunk's
        last."""
        if c.seq.context_routed and not c.decode:
            self.scored[c.seq.seq_id] = (len(self.keep), n)
            self.keep.extend(range(start, start + n))
            if c.seq.wants_prompt_logprobs and row is not None:
                self.echo[row] = self.scored[c.seq.seq_id]
        elif row is None:
            return
        # an echo row decoding in a MIXED step: its next token only
        elif c.seq.wants_prompt_logprobs and not c.decode:
            assert c.start[key] == 0, "echo prompts bypass the prefix cache and are never chunked"
            self.echo[row] = (len(self.keep), n)
            self.keep.extend(range(start, start + n))
        else:
            self.keep.append(start + n - 1)
        if row is not None:
            self.last.append(len(self.keep) - 1)


def prefill_forward(
    lm: LoadedModel, kv: ModelKV, inputs: PrefillInputs, up: Callable[[np.ndarray], torch.Tensor]
) -> torch.Tensor:
    """The packed forward of `inputs` on `lm` over its cache `kv`: logits [K, V] of the kept positions."""
    singles = None
    if inputs.singles is not None:
        segments, starts, tables, lengths = inputs.singles
        singles = SingleTokens(segments, up(starts), up(tables), up(lengths))
    ctx = PrefillContext(
        kv,
        up(inputs.pages),
        up(inputs.pos % kv.block_size),
        inputs.segments,
        cached=inputs.cached,
        context=[None if c is None else up(c) for c in inputs.context],
        singles=singles,
    )
    out = lm.model(
        input_ids=up(inputs.ids).unsqueeze(0),  # [1, N]
        position_ids=up(inputs.pos).unsqueeze(0),
        attention_mask=ctx.attention_mask,
        use_cache=False,
        logits_to_keep=up(inputs.keep),
        memdec_ctx=ctx,
    )
    return out.logits[0, :, : lm.vocab_size]


def default_num_pages(
    base: LoadedModel, config: EngineConfig, geometry: KVGeometry, block_tokens: int
) -> int:
    """The KV budget in pages: `--num-gpu-blocks-override`, else measured on CUDA, else sized on CPU.

    CUDA (vLLM's meaning of --gpu-memory-utilization): this process may use that fraction of the
    GPU's memory; what is already used (weights, CUDA context, other processes), the peak activation
    memory of a prefill at the token budget and the decode graphs' workspace are taken off, the rest
    is KV. CPU: room for max_num_seqs full-length sequences in the base and as many in memories.
    """
    if config.num_gpu_blocks_override is not None:
        return config.num_gpu_blocks_override
    page_bytes = page_bytes_for(geometry, block_tokens)
    per_seq = -(-base.max_model_len // block_tokens)
    if base.device.type != "cuda":
        return min(2 * config.max_num_seqs * per_seq + 1, (4 << 30) // page_bytes)
    device = base.device
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    tokens = min(config.max_num_batched_tokens, base.max_model_len)
    with torch.inference_mode():
        base.model(input_ids=torch.zeros(1, tokens, dtype=torch.long, device=device), logits_to_keep=1)
    torch.cuda.synchronize(device)
    activation = torch.cuda.max_memory_allocated(device) - before
    # The largest decode graph gathers every row's pages for one layer (keys and values), plus logits.
    workspace = 4 * config.max_num_seqs * base.max_model_len * geometry.token_bytes // geometry.num_layers
    workspace += 4 * config.max_num_seqs * base.vocab_size * 4
    if config.speculative_tokens:
        # The verify graphs' own pool (the same gather), and a round's [B, K+1, V] float32 tensors: log-probs,
        # the memories' log-probs and q̃, q̃ gathered, p̃, the residual, and its float64 cumulative sum (two).
        t = config.speculative_tokens + 1
        workspace += (
            4 * config.max_num_seqs * base.max_model_len * geometry.token_bytes // geometry.num_layers
        )
        workspace += 8 * config.max_num_seqs * t * base.vocab_size * 4
    budget = int(total * config.gpu_memory_utilization) - (total - free) - activation - workspace
    pages = budget // page_bytes
    log.info(
        "KV budget: %.2f GiB of %.1f GiB (in use %.2f, prefill activations %.2f, decode workspace %.2f): "
        "%d pages of %d tokens",
        max(budget, 0) / 2**30,
        total / 2**30,
        (total - free) / 2**30,
        activation / 2**30,
        workspace / 2**30,
        pages,
        block_tokens,
    )
    if pages < per_seq + 1:
        raise RuntimeError(
            f"not enough GPU memory for the KV cache of one {base.max_model_len}-token sequence at "
            f"--gpu-memory-utilization {config.gpu_memory_utilization}: raise it or lower --max-model-len"
        )
    return pages


@dataclass(frozen=True)
class MemoryJob:
    """One memory's part of a step's forwards (`ModelRunner._forward`): `run` it on the side stream; when it
    raises, `contain` is told the exception and fails only what the memory was running for."""

    name: str
    run: Callable[[], Any]
    contain: Callable[[Exception], None]


@dataclass(frozen=True)
class Forwards(Generic[T]):
    """What `ModelRunner._forward` returns: the base's result and each memory's (on the main stream now)."""

    base: T
    # memory -> what its job returned; absent when the job raised (and was contained)
    memories: dict[str, Any]
    timers: tuple[_Timer, _Timer]  # base, memories


def _fail_rows(failed: dict[int, str], rows: list[int], exc: Exception) -> None:
    """A memory's forward raised: the batch rows that use it fail with the same message."""
    failed.update(dict.fromkeys(rows, forward_failed("memory", exc)))


def _fail_chunks(failed: dict[int, str], failed_chunks: dict[int, str], targets: list[tuple[int, int | None]],
                 exc: Exception) -> None:
    """A memory's prefill raised: each of its chunks fails, as its batch row when it is its prompt's last one
    ((seq_id, row)), else by sequence (`StepLogits.failed_chunks`)."""
    message = forward_failed("memory", exc)
    for seq_id, row in targets:
        if row is None:
            failed_chunks[seq_id] = message
        else:
            failed[row] = message


class ModelRunner:
    def __init__(self, base: LoadedModel, config: EngineConfig) -> None:
        self.base = base
        self.config = config
        self.device = base.device
        self.num_slots = config.max_num_seqs
        # Tensor parallelism: the base is sharded by heads over ranks that run its every forward with this
        # one (server/tp.py); this rank's cache holds its own key/value heads, and every rank must agree on
        # the pages. Without it the same calls go to `Unsharded`, which has no other rank to tell: no branch
        # here knows.
        self.shards: ShardedBase | Unsharded = base.tensor_parallel or Unsharded()
        base_geometry = self._geometry(None, base)
        page_bytes = page_bytes_for(base_geometry, config.block_size)
        num_pages = self.shards.agree_on_pages(
            default_num_pages(base, config, base_geometry, config.block_size)
        )
        self.pool = PagePool(num_pages, page_bytes, self.device)
        self.upload = Uploader(self.device)
        # Each slot's last sampled token: the next decode step's input, written by the sampler on the device.
        self.tokens = torch.zeros(self.num_slots + 1, dtype=torch.long, device=self.device)  # [S+1]
        self.use_graphs = not config.enforce_eager and self.device.type == "cuda"
        self.side_stream = (
            torch.cuda.Stream(self.device) if config.use_cuda_streams and self.device.type == "cuda" else None
        )
        self._token_updates: dict[int, int] = {}  # slot -> last token, set by the host (rollback)
        self.models: dict[ModelKey, ModelState] = {}
        # the one writer of every sequence's lengths and pages (`server.kv`)
        self.caches = SequenceKV(self.kv)
        self.add_model(None, base)
        if config.speculative_tokens:
            state = self.models[None]
            state.verify = VerifyGraphs(
                base, state.kv, self.num_slots, config.speculative_tokens + 1, self.use_graphs
            )
            seconds = state.verify.capture()
            state.capture_seconds += seconds
            if seconds:
                log.info(
                    "captured the base's verify graphs (T = %d) in %.2f s",
                    config.speculative_tokens + 1,
                    seconds,
                )

    # -- models ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def add_model(self, key: ModelKey, lm: LoadedModel) -> float:
        """Lay out `lm`'s KV view and capture its decode graphs. Returns the capture time in seconds."""
        if lm.dtype != self.base.dtype:
            raise ValueError(f"model dtype {lm.dtype} differs from the base's {self.base.dtype}")
        use_paged_attention(lm.model)
        geometry = self._geometry(key, lm)
        scratch = SCRATCH_PAGE if key is None else self.pool.take_scratch()  # one per model: see server/kv.py
        try:
            # A fresh view per load: its prefix-cache table starts empty, so a memory reloaded under the same
            # name (or another model given that name) never serves blocks computed by the one before.
            kv = ModelKV(
                self.pool,
                geometry,
                self.num_slots,
                min(lm.max_model_len, self.base.max_model_len),
                scratch,
                prefix_caching=self.config.enable_prefix_caching,
            )
            graphs = DecodeGraphs(lm, kv, self.tokens, self.num_slots, self.use_graphs)
            state = ModelState(lm, kv, graphs)
            state.capture_seconds = graphs.capture()
        except BaseException:
            if key is not None:
                self.pool.give_back_scratch(scratch)
            raise
        self.models[key] = state
        if state.capture_seconds:
            log.info(
                "captured %d decode graphs for %s in %.2f s",
                len(graphs.batch_sizes) * len(graphs.block_sizes),
                key or "the base",
                state.capture_seconds,
            )
        return state.capture_seconds

    def _geometry(self, key: ModelKey, lm: LoadedModel) -> KVGeometry:
        """A model's KV per token on this rank: the base's own heads under tensor parallelism (memories run
        whole)."""
        return KVGeometry.of(lm.model.config, lm.dtype, self.shards.world_size if key is None else 1)

    def has_model(self, key: ModelKey, lm: LoadedModel) -> bool:
        state = self.models.get(key)
        return state is not None and state.lm is lm

    def remove_model(self, key: str) -> None:
        state = self.models.pop(key, None)
        if state is not None:
            state.graphs.release()
            state.kv.drop_cache()  # its cached blocks are never served again: their pages are free now
            self.pool.give_back_scratch(state.kv.scratch_page)

    def kv(self, key: ModelKey) -> ModelKV:
        return self.models[key].kv

    # -- batches -----------------------------------------------------------------------------------
    def make_batch(self, seqs: list[Sequence]) -> RowBatch:
        """Upload what the device needs about these rows (no host sync)."""
        up = self.upload
        slots = [s.row for s in seqs]
        by_memory: dict[str, list[tuple[int, MemoryUse]]] = {}
        for i, s in enumerate(seqs):
            for m in s.memories:
                by_memory.setdefault(m.name, []).append((i, m))
        groups = []
        for name, uses in by_memory.items():
            rows = [i for i, _ in uses]
            group_slots = [slots[i] for i in rows]
            alpha = up(np.asarray([m.alpha for _, m in uses], dtype=np.float32))
            temps = [m.temperature for _, m in uses]
            temperature = (
                None if all(t == 1.0 for t in temps) else up(np.asarray(temps, dtype=np.float32)).unsqueeze(1)
            )
            routed = [m.router is not None for _, m in uses]
            router = next((m.router for _, m in uses if m.router is not None), None)
            groups.append(MemoryGroup(
                name, rows, up(np.asarray(rows, dtype=np.int64)), group_slots,
                up(np.asarray(group_slots, dtype=np.int64)), alpha, torch.log(alpha).unsqueeze(1),
                temperature, whole_batch=len(rows) == len(seqs), router=router,
                routed=(
                    up(np.asarray(routed)).unsqueeze(1) if router is not None and not all(routed) else None
                ),
            ))
        log_base_weight = None
        if groups:  # log(1 − Σ αᵢ) in float64 on the host (exact −inf at 0), then float32
            weights = np.asarray([s.base_weight for s in seqs], dtype=np.float64)
            with np.errstate(divide="ignore"):
                log_base_weight = up(np.log(weights).astype(np.float32)).unsqueeze(1)
        sampling = sampling_rows([s.params for s in seqs], [s.seed for s in seqs], up)
        multi = [s.row for s in seqs if len(s.memories) > 1]
        want = [i for i, s in enumerate(seqs) if s.wants_logprobs]
        spec = [i for i, s in enumerate(seqs) if s.speculative] if self.config.speculative_tokens else []
        spec_mask = np.zeros(len(seqs), dtype=bool)
        spec_mask[spec] = True
        return RowBatch(
            seqs=seqs,
            slots=slots,
            slots_dev=up(np.asarray(slots, dtype=np.int64)),
            groups=groups,
            log_base_weight=log_base_weight,
            multi_slots_dev=up(np.asarray(multi, dtype=np.int64)) if multi else None,
            sampling=sampling,
            logprob_rows=want,
            logprob_rows_dev=up(np.asarray(want, dtype=np.int64)),
            num_top=max((seqs[i].params.logprobs or 0 for i in want), default=0),
            spec_rows=spec,
            spec_mask=up(spec_mask),
        )

    def make_plan(self, batch: RowBatch, k_rows: list[int]) -> SpecPlan:
        """Upload a speculative round's shape (no host sync): step i of a memory runs its rows with
        k_row >= i − 1."""
        up = self.upload
        k = max(k_rows)
        steps: dict[str, list[DraftStep]] = {}
        for g in batch.groups:
            depth = np.asarray([k_rows[i] for i in g.rows])
            steps[g.name] = []
            for i in range(1, k + 2):
                inside = np.flatnonzero(depth >= i - 1)
                if not len(inside):  # the group's rows shrink step by step: none is left from here on
                    break
                whole = len(inside) == len(g.rows)
                if whole:
                    step = DraftStep(up(inside), g.rows_dev, g.slots, g.slots_dev, whole_group=True)
                elif steps[g.name] and len(inside) == len(steps[g.name][-1].slots):
                    step = steps[g.name][-1]  # the same rows as the step before
                else:
                    slots = [g.slots[j] for j in inside]
                    step = DraftStep(
                        up(inside),
                        up(np.asarray([g.rows[j] for j in inside], dtype=np.int64)),
                        slots,
                        up(np.asarray(slots, dtype=np.int64)),
                        whole_group=False,
                    )
                steps[g.name].append(step)
        return SpecPlan(k, k_rows, up(np.asarray(k_rows, dtype=np.int64)), steps)

    def set_last_token(self, slot: int, token: int) -> None:
        """The next decode input of `slot`, when the host rewrites it (a rollback); applied by `flush`."""
        self._token_updates[slot] = token

    def flush(self) -> None:
        """Apply pending KV table changes and last-token rewrites on the device (start of a step)."""
        for key, state in self.models.items():
            if state.kv.pending:
                if key is None:
                    with self.shards.lockstep():
                        self.shards.flush(state.kv)
                state.kv.flush(self.upload)
        if self._token_updates:
            t = self.upload(np.asarray(list(self._token_updates.items()), dtype=np.int64).T.copy())  # [2, n]
            self.tokens.index_put_((t[0],), t[1])
            self._token_updates = {}

    def step_done(self) -> None:
        """After the step's host sync: staging buffers are free again."""
        self.upload.reset()

    # -- forwards ----------------------------------------------------------------------------------
    def _pack_prefill(
        self, key: ModelKey, chunks: list[PrefillChunk], rows: list[int | None]
    ) -> PackedPrefill | None:
        """One model's packed forward over prompt chunks, each from where this model's cache of it ends (None:
        its cache already holds them all, as when its prefix hit went further).

        rows[i]: the batch row of chunk i when it is its prompt's last (its last position's logits are
        kept), None for an earlier chunk (nothing is kept).
        """
        kv = self.models[key].kv
        todo = [(c, r) for c, r in zip(chunks, rows, strict=True) if c.start[key] < c.end]
        assert all(r is None for c, r in zip(chunks, rows, strict=True) if c.start[key] >= c.end), (
            "a final chunk computes its last token"
        )
        if not todo:
            return None
        spans = [(c.start[key], c.end) for c, _ in todo]
        lengths = [e - b for b, e in spans]
        starts = np.cumsum([0, *lengths[:-1]])
        ids = np.concatenate(
            [
                np.asarray(c.seq.token_ids[b:e], dtype=np.int64)
                for (c, _), (b, e) in zip(todo, spans, strict=True)
            ]
        )
        pos = np.concatenate([np.arange(b, e, dtype=np.int64) for b, e in spans])  # [N]
        slots = np.repeat(np.asarray([c.seq.row for c, _ in todo], dtype=np.int64), lengths)
        packed = PackedPrefill(key=key)
        for (c, row), start, n in zip(todo, starts, lengths, strict=True):
            packed.keep_positions(c, row, key, int(start), n)
        # One-token segments on a cache (decode rows of a MIXED step) attend together; the others one by one.
        single = [i for i, (b, e) in enumerate(spans) if b and e - b == 1]
        in_single = set(single)
        singles = None
        if single:
            nblk = max(kv.blocks_for(spans[i][1]) for i in single)
            slot_ids = [todo[i][0].seq.row for i in single]
            singles = (
                frozenset(single),
                starts[single].astype(np.int64),
                kv.host_tables[slot_ids, :nblk].copy(),  # past a row's blocks: its scratch entries, masked
                np.asarray([spans[i][1] for i in single], dtype=np.int64),
            )
        packed.inputs = PrefillInputs(
            ids=ids,
            pos=pos,
            pages=kv.host_tables[slots, pos // kv.block_size],
            segments=list(zip(starts.tolist(), lengths, strict=True)),
            cached=[b for b, _ in spans],
            context=[
                kv.host_tables[c.seq.row, : kv.blocks_for(e)].copy() if b and i not in in_single else None
                for i, ((c, _), (b, e)) in enumerate(zip(todo, spans, strict=True))
            ],
            singles=singles,
            # earlier chunks only: one, unused
            keep=np.asarray(packed.keep or [len(ids) - 1], dtype=np.int64),
        )
        return packed

    def _prefill_model(
        self, key: ModelKey, chunks: list[PrefillChunk], rows: list[int | None]
    ) -> PrefillOutput:
        """Pack (`_pack_prefill`) and run one model's prefill forward over these chunks."""
        packed = self._pack_prefill(key, chunks, rows)
        if packed is None:
            return PrefillOutput(None, {}, {})
        assert packed.inputs is not None
        if key is None:
            self.shards.prefill(packed.inputs)  # the other ranks run the same forward on their heads
        state = self.models[key]
        logits = prefill_forward(state.lm, state.kv, packed.inputs, self.upload)  # [K, V]
        scored = {seq_id: logits[a : a + n] for seq_id, (a, n) in packed.scored.items()}
        if not packed.last:
            return PrefillOutput(None, {}, scored)
        prompt = {row: logits[a : a + n] for row, (a, n) in packed.echo.items()}
        return PrefillOutput(logits[self.upload(np.asarray(packed.last, dtype=np.int64))], prompt, scored)

    def prefill(self, batch: RowBatch | None, chunks: list[PrefillChunk]) -> StepLogits:
        """Forwards over this step's prompt chunks; `batch` holds the sequences whose last chunk this is, in
        chunk order (None when every chunk is an earlier one): only they get logits."""
        seqs = batch.seqs if batch is not None else []
        row_of = {s.seq_id: i for i, s in enumerate(seqs)}
        rows = [row_of.get(c.seq.seq_id) if c.final else None for c in chunks]
        failed: dict[int, str] = {}
        failed_chunks: dict[int, str] = {}
        by_memory: dict[str, list[int]] = {}
        for i, c in enumerate(chunks):
            for name in c.seq.memory_names:
                by_memory.setdefault(name, []).append(i)
        jobs = [
            MemoryJob(
                name,
                partial(self._prefill_model, name, [chunks[i] for i in idx], [rows[i] for i in idx]),
                partial(
                    _fail_chunks, failed, failed_chunks, [(chunks[i].seq.seq_id, rows[i]) for i in idx]
                ),
            )
            for name, idx in by_memory.items()
        ]
        fw: Forwards[PrefillOutput] = self._forward(
            partial(self._prefill_model, None, chunks, rows), jobs, "prefill"
        )
        outputs: dict[ModelKey, PrefillOutput] = {None: fw.base}
        outputs.update(fw.memories)
        prompt: dict[int, dict[ModelKey, torch.Tensor]] = {}
        scored: dict[int, dict[ModelKey, torch.Tensor]] = {}
        for key, out in outputs.items():
            for row, lp in out.prompt.items():
                prompt.setdefault(row, {})[key] = lp
            for seq_id, lp in out.scored.items():
                scored.setdefault(seq_id, {})[key] = lp
        last = {name: out.last for name, out in fw.memories.items() if out.last is not None}
        base_logits = fw.base.last
        if base_logits is None:  # no prompt ended in this step
            base_logits = torch.empty(0, self.base.vocab_size, device=self.device)
        return StepLogits(base_logits, last, prompt, failed, fw.timers, failed_chunks, scored)

    def _longest(self, key: ModelKey, slots: list[int], new: int) -> int:
        """The longest of these rows' caches in `key` once `new` more tokens are written: the attention's
        bound."""
        return int(self.models[key].kv.host_lengths[slots].max()) + new

    def _decode_model(self, key: ModelKey, slots_dev: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """One decode step of `key` for these slots (their last tokens in `self.tokens`): logits [b, V]."""
        return self.models[key].graphs.run(slots_dev, len(slots), self._longest(key, slots, 1))

    def _decode_base(self, batch: RowBatch) -> torch.Tensor:
        self.shards.decode(self.tokens, batch.slots, self._longest(None, batch.slots, 1))
        return self._decode_model(None, batch.slots_dev, batch.slots)

    def decode(self, batch: RowBatch) -> StepLogits:
        failed: dict[int, str] = {}
        jobs = [
            MemoryJob(
                g.name,
                partial(self._decode_model, g.name, g.slots_dev, g.slots),
                partial(_fail_rows, failed, g.rows),
            )
            for g in batch.groups
        ]
        fw: Forwards[torch.Tensor] = self._forward(partial(self._decode_base, batch), jobs, "decode")
        # The step's token is now cached in every model that ran it.
        self.caches.decoded(None, batch.slots, batch.slots_dev)
        for g in batch.groups:
            if g.name in fw.memories:
                self.caches.decoded(g.name, g.slots, g.slots_dev)
        return StepLogits(fw.base, fw.memories, {}, failed, fw.timers)

    def speculate(self, batch: RowBatch, plan: SpecPlan) -> SpecLogits:
        """A speculative round's forwards: k draft steps of each memory (each drawing its draft on the device
        and feeding it to the next step), then the base's verify of T = k + 1 tokens per row, overlapped on
        CUDA with each memory's last step (on the draft of step k, for the distribution at position k).

        Lengths: each memory's advance step by step (its forward reads them); the base's do not move here,
        the engine sets every cache's length once it knows what was accepted.
        """
        t = plan.k + 1
        base = self.models[None]
        uniforms = None  # [3, B, T] every random number of the round, drawn at once
        if batch.sampling.any_sampled:
            start = base.kv.lengths.index_select(0, batch.slots_dev)  # [B] tokens the base has cached
            # [B, T] index of each position's token
            counter = start[:, None] + 1 + torch.arange(t, device=self.device)
            uniforms = speculative_uniforms(
                batch.sampling.seed.repeat_interleave(t), counter.flatten()
            ).view(3, -1, t)
        ids = torch.zeros(len(batch.seqs), t, dtype=torch.long, device=self.device)  # [B, T] verify input
        # each row's last token (drafts overwrite it below)
        ids[:, 0] = self.tokens.index_select(0, batch.slots_dev)
        multi_inputs = (
            self.tokens.index_select(0, batch.multi_slots_dev) if batch.multi_slots_dev is not None else None
        )
        rnd = _Drafting(
            batch,
            plan,
            uniforms,
            {g.name: self._draft_buffers(len(g.rows), t, batch) for g in batch.groups},
            multi_inputs,
        )
        live = [g for g in batch.groups if plan.steps[g.name]]
        draft_timer = _Timer(self.device)
        with draft_timer:
            for i in range(1, t):
                for g in live:
                    self._attempt(self._draft_job(rnd, g, i), "draft step")
        for g in live:
            if g.name not in rnd.failed_groups:
                ids[:, 1:].index_copy_(0, g.rows_dev, rnd.drafts[g.name].tokens[:, : t - 1])
        # The last draft steps overlap the verify. Buffers they write were made on the main stream, which
        # waits for the side one before reading or freeing them; what the side stream allocates it also frees.
        fw: Forwards[torch.Tensor] = self._forward(
            partial(self._verify, batch, plan, ids),
            [self._draft_job(rnd, g, t) for g in live],
            "draft step",
        )
        timers = (fw.timers[0], draft_timer, fw.timers[1])
        return SpecLogits(fw.base, rnd.drafts, uniforms, rnd.failed, timers)

    def _verify(self, batch: RowBatch, plan: SpecPlan, ids: torch.Tensor) -> torch.Tensor:
        """The base's verify of a round's T = k + 1 tokens per row (`ids` [B, T]; row b's first k_b + 1
        valid)."""
        base = self.models[None]
        assert base.verify is not None
        longest = self._longest(None, batch.slots, plan.k + 1)
        valid = plan.k_dev + 1
        self.shards.verify(batch.slots, ids, valid, longest)
        return base.verify.run(batch.slots_dev, ids, valid, longest)

    def _draft_buffers(self, rows: int, t: int, batch: RowBatch) -> DraftBuffers:
        vocab = self.base.vocab_size
        return DraftBuffers(
            torch.zeros(rows, t, vocab, device=self.device),
            torch.zeros(rows, t, vocab, device=self.device) if batch.sampling.any_sampled else None,
            torch.zeros(rows, t, dtype=torch.long, device=self.device),
        )

    def _draft_job(self, rnd: _Drafting, g: MemoryGroup, i: int) -> MemoryJob:
        return MemoryJob(g.name, partial(self._draft, rnd, g, i), partial(rnd.fail, g))

    def _draft(self, rnd: _Drafting, g: MemoryGroup, i: int) -> None:
        """Memory step i (1-based) of group g: its distribution at position i − 1 and a draft from it, which
        is the next step's input. Nothing once the group failed or has no rows left at step i."""
        steps = rnd.plan.steps[g.name]
        if g.name in rnd.failed_groups or i > len(steps):
            return
        step = steps[i - 1]
        logits = self._decode_model(g.name, step.slots_dev, step.slots)
        self.caches.decoded(g.name, step.slots, step.slots_dev)
        temperature = g.temperature
        if temperature is not None and not step.whole_group:
            temperature = temperature.index_select(0, step.rows)
        logp = memory_logprobs(logits, temperature)  # [b_i, V] q: the tempered memory distribution
        u = (
            rnd.uniforms[DRAFT, :, i - 1].index_select(0, step.batch_rows)
            if rnd.uniforms is not None
            else None
        )
        proposed = propose(logp, rnd.batch.sampling.select(step.batch_rows), u)
        rnd.drafts[g.name].put(step, i - 1, logp, proposed.tokens, proposed.probs)
        if i <= rnd.plan.k:
            self.tokens.index_copy_(0, step.slots_dev, proposed.tokens)
            if rnd.multi_inputs is not None and i == 1:  # the next memory's first step reads their last token
                assert rnd.batch.multi_slots_dev is not None
                self.tokens.index_copy_(0, rnd.batch.multi_slots_dev, rnd.multi_inputs)

    def score(
        self,
        keys: list[tuple[str, float]],
        ids: torch.Tensor,
        windows: list[Window],
        distributions: bool = False,
    ) -> dict[ModelKey, torch.Tensor | Exception]:
        """Perplexity windows: target log-probs [B, S] of the base and, overlapped, of each memory of `keys`
        ((name, temperature): its logits divided by the temperature); with `distributions`, whole next-token
        log-distributions [B, S, V] instead (per-token top alternatives). A memory that raised has its
        exception instead (the job fails, the engine goes on)."""
        result: dict[ModelKey, torch.Tensor | Exception] = {}
        vocab = self.base.vocab_size
        scorer = batch_distributions if distributions else batch_logprobs
        jobs = [
            MemoryJob(
                key,
                partial(scorer, self.models[key].lm.model, ids, windows, vocab, temperature),
                partial(result.__setitem__, key),
            )
            for key, temperature in keys
        ]
        fw: Forwards[torch.Tensor] = self._forward(
            partial(self._score_base, ids, windows, distributions), jobs, "perplexity"
        )
        result.update(fw.memories)
        result[None] = fw.base
        return result

    def _score_base(self, ids: torch.Tensor, windows: list[Window], distributions: bool) -> torch.Tensor:
        self.shards.score(ids, windows, distributions)
        return (batch_distributions if distributions else batch_logprobs)(
            self.base.model, ids, windows, self.base.vocab_size
        )

    # -- the one forward pattern ------------------------------------------------------------------
    def _forward(self, base: Callable[[], T], jobs: list[MemoryJob], phase: str) -> Forwards[T]:
        """Run the base on the main stream and each memory's job on the side stream, overlapped on CUDA, each
        under its timer. A memory that raises is contained (`_attempt`: only its rows fail); the base's
        exceptions propagate (the engine fails the step's rows), and under tensor parallelism they are fatal
        (`lockstep`)."""
        timers = _Timer(self.device), _Timer(self.device, self.side_stream)
        memories: dict[str, Any] = {}
        if self.side_stream is None:
            out = self._run_base(base, timers[0])
            self._run_memories(jobs, phase, timers[1], memories)
            return Forwards(out, memories, timers)
        main = self._main_stream = torch.cuda.current_stream(self.device)
        # The side stream must see this step's uploads and the previous step's writes before it starts.
        self.side_stream.wait_stream(main)
        try:
            with torch.cuda.stream(self.side_stream):
                # enqueues kernels and returns: they overlap
                self._run_memories(jobs, phase, timers[1], memories)
            out = self._run_base(base, timers[0])
        finally:
            main.wait_stream(self.side_stream)  # mixing reads the memory logits
        return Forwards(out, memories, timers)

    def _run_base(self, base: Callable[[], T], timer: _Timer) -> T:
        with timer, self.shards.lockstep():
            return base()

    def _run_memories(self, jobs: list[MemoryJob], phase: str, timer: _Timer, into: dict[str, Any]) -> None:
        for job in jobs:
            with timer:
                ok, out = self._attempt(job, phase)
            if ok:
                into[job.name] = self._on_main(out)

    @staticmethod
    def _attempt(job: MemoryJob, phase: str) -> tuple[bool, Any]:
        """Run one memory's job; if it raises, log it and let the job contain it. Returns (ran, result)."""
        try:
            return True, job.run()
        except Exception as exc:  # contained: only what this memory was running for fails
            log.exception("memory %s %s failed", job.name, phase)
            job.contain(exc)
            return False, None

    def _on_main(self, out: Any) -> Any:
        """Tensors made on the side stream (in a job's result), now read on the main one: each keeps its
        memory until main is done with it."""
        if self.side_stream is None:
            return out
        if isinstance(out, torch.Tensor):
            out.record_stream(self._main_stream)
        elif isinstance(out, dict):
            for v in out.values():
                self._on_main(v)
        elif isinstance(out, tuple):
            for v in out:
                self._on_main(v)
        return out

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_usable

