"""Train a memory decoder (or, with β = 0 and no targets, a plain causal LM) on a token stream.

Sequences are consecutive `seq_len` slices of the stream; sequence s covers input positions
[s·L, (s+1)·L), whose labels are the next tokens and whose kNN targets are datastore rows with the
same position numbers. The data order of every epoch is a permutation drawn from (seed, epoch), so
a resumed run finds its place from the step count alone.

Under torch.distributed (torchrun; memories.distributed) the model is wrapped in DDP and every flag keeps
its one-process meaning: a micro-batch is still `batch_size` sequences of the same schedule, each rank
taking a contiguous share of them, and each rank's loss is its share of the whole micro-batch's averages
(memories.loss.BatchTotals), so the averaged gradients, the logged losses and hence the trajectory are
those of one process up to float summation order (for a model without dropout: dropout masks would come
from each rank's own RNG). Rank 0 alone writes checkpoints and the model; a checkpoint holds nothing of
the world size, so a run resumes at any world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from memories import distributed
from memories.config import ModelSpec, TrainConfig
from memories.jsonfile import read_json, write_json
from memories.loss import BatchTotals, memory_loss
from memories.manifest import Manifest, tokenizer_fingerprint, write_manifest
from memories.models import (
    context_length,
    embedding_rows,
    is_gguf_path,
    load_causal_lm,
    load_tokenizer,
    move,
    resolve_device,
)
from memories.targets import SparseTargets

CHECKPOINT_STATE = "trainer_state.json"


class TrainError(ValueError):
    """Training cannot start: inconsistent inputs or a checkpoint from a different configuration."""


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    steps_done: int
    total_steps: int
    finished: bool
    losses: list[float]
    seconds: float
    tokens_seen: int


def new_model(spec: ModelSpec, tokenizer: Any, seed: int) -> PreTrainedModel:
    if spec.arch not in ("llama", "qwen2"):
        raise TrainError(f"--arch must be llama or qwen2, got {spec.arch!r}")
    if spec.hidden_size % spec.heads:
        raise TrainError(f"hidden size {spec.hidden_size} is not divisible by {spec.heads} heads")
    kv = spec.kv_heads or spec.heads
    if spec.heads % kv:
        raise TrainError(f"{spec.heads} heads are not divisible into {kv} key-value heads")
    inter = spec.intermediate_size or 32 * math.ceil(spec.hidden_size * 8 / 3 / 32)
    eos = tokenizer.eos_token_id
    config = AutoConfig.for_model(
        spec.arch,
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=inter,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=kv,
        max_position_embeddings=spec.max_len,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if spec.embeddings_from is not None:
        _project_embeddings(model, spec.embeddings_from, tokenizer)
    return model


def _check_same_tokenizer(path: str | Path, tokenizer: Any) -> None:
    if tokenizer_fingerprint(load_tokenizer(path)) != tokenizer_fingerprint(tokenizer):
        raise TrainError(f"{path} uses a different tokenizer from the base model; cannot be its memory")


@torch.no_grad()
def _project_embeddings(model: PreTrainedModel, source: str, tokenizer: Any) -> None:
    """Start `model`'s embedding from `source`'s, E·V_r, V_r its top-r right singular vectors (r = the new
    hidden size): the rank-r map that keeps the most of E's rows, so that tokens the source model embeds
    alike start alike (on the demo's base it did not beat a random start measurably: docs/demo.md). Tied
    output layers follow; the transformer layers stay random."""
    _check_same_tokenizer(source, tokenizer)
    theirs_layer: Any = load_causal_lm(source).get_input_embeddings()
    theirs = theirs_layer.weight.float()[: len(tokenizer)]  # [V, H_src]
    mine_layer: Any = model.get_input_embeddings()
    mine = mine_layer.weight  # [V', r]
    r = mine.shape[1]
    if r > theirs.shape[1]:
        raise TrainError(f"--init-embeddings-from {source}: its embedding has {theirs.shape[1]} dimensions, "
                         f"fewer than the new model's hidden size {r}")
    _, _, vh = torch.linalg.svd(theirs, full_matrices=False)  # vh [H_src, H_src], rows by singular value
    mine[: len(tokenizer)] = (theirs @ vh[:r].T).to(mine.dtype)  # [V, r]


def init_model(init_from: str | Path | None, spec: ModelSpec | None, tokenizer: Any,
               seed: int) -> PreTrainedModel:
    """The memory's starting point: an existing HF directory, or a new model from `spec`."""
    if init_from is not None:
        path = Path(init_from)
        if (is_gguf_path(path) or (path / "tokenizer.json").is_file()
                or (path / "tokenizer_config.json").is_file()):
            _check_same_tokenizer(path, tokenizer)
        model = load_causal_lm(path)
        rows = embedding_rows(model.get_input_embeddings())
        if rows < len(tokenizer):
            raise TrainError(f"{path} has {rows} embedding rows, fewer than the tokenizer's "
                             f"{len(tokenizer)} tokens")
        return model
    return new_model(spec or ModelSpec(), tokenizer, seed)


class TrainData:
    """Fixed-length sequences of the token stream, with their sparse kNN targets when given."""

    def __init__(self, tokens: np.ndarray, targets: SparseTargets | None, seq_len: int) -> None:
        self.tokens = np.asarray(tokens)
        self.targets = targets
        n_pos = len(self.tokens) - 1  # positions that have a next token
        if targets is not None and len(targets) != n_pos:
            raise TrainError(f"targets have {len(targets)} rows but the token stream has {n_pos} positions")
        self.seq_len = min(seq_len, n_pos)
        if self.seq_len < 1:
            raise TrainError("the token stream is too short to train on")
        self.num_sequences = n_pos // self.seq_len

    def batch(self, seqs: np.ndarray) -> dict[str, torch.Tensor]:
        L = self.seq_len
        starts = np.asarray(seqs, dtype=np.int64) * L  # [B]
        pos = starts[:, None] + np.arange(L)[None, :]  # [B, L]
        out = {
            "input_ids": torch.from_numpy(self.tokens[pos].astype(np.int64)),  # [B, L]
            "labels": torch.from_numpy(self.tokens[pos + 1].astype(np.int64)),  # [B, L]
        }
        if self.targets is not None:
            ids, probs = self.targets.padded(pos.ravel())  # [B*L, K] each
            out["knn_ids"] = torch.from_numpy(ids.reshape(len(seqs), L, -1))  # [B, L, K]
            out["knn_probs"] = torch.from_numpy(probs.reshape(len(seqs), L, -1))  # [B, L, K]
        return out


class Schedule:
    """Which sequences make micro-batch m: epoch e = m // per_epoch uses permutation(seed, e)."""

    def __init__(self, num_sequences: int, batch_size: int, seed: int) -> None:
        self.num_sequences = num_sequences
        self.batch_size = min(batch_size, num_sequences)
        self.per_epoch = max(1, num_sequences // self.batch_size)
        self.seed = seed
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def micro_batch(self, m: int) -> np.ndarray:
        epoch, i = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            self._epoch = epoch
        return self._order[i * self.batch_size : (i + 1) * self.batch_size]


def _lr_lambda(total: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)  # no decay on biases and norm gains
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    ckpt_dir: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict
) -> None:
    """Model + optimizer + scheduler + RNG + step, replacing the previous checkpoint atomically."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    write_json(tmp / CHECKPOINT_STATE, state)
    if ckpt_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        ckpt_dir.rename(old)
    tmp.rename(ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def _find_checkpoint(ckpt_dir: Path) -> Path | None:
    for candidate in (ckpt_dir, ckpt_dir.with_name(ckpt_dir.name + ".old")):
        if (candidate / CHECKPOINT_STATE).is_file():
            return candidate
    return None


@dataclass
class _Run:
    """A training run's state, carried from one stage of `train` to the next (and into checkpoints)."""

    config: TrainConfig
    model: PreTrainedModel
    data: TrainData
    schedule: Schedule
    total: int  # optimizer steps of the whole run
    warmup: int
    identity: dict[str, Any]  # what a checkpoint must match to be resumed
    device: torch.device
    vocab_size: int  # len(tokenizer): logits beyond it are embedding padding
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    ddp: torch.nn.Module | None = None  # the DDP wrapper of `model` under torch.distributed
    start_step: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {"losses": [], "kl": [], "ce": []})

    def checkpoint(self, ckpt_dir: Path, step: int) -> None:
        assert self.optimizer is not None
        if not distributed.world().is_main:  # every rank holds the same weights and optimizer state
            return
        save_checkpoint(ckpt_dir, self.model, self.optimizer, self.scheduler,
                        {"run": self.identity, "step": step, **self.history})

    def tokens_seen(self, steps: int) -> int:
        return steps * self.config.grad_accum * self.schedule.batch_size * self.data.seq_len


def train(
    config: TrainConfig,
    out_dir: str | Path,
    tokenizer: Any,
    tokens: np.ndarray,
    targets: SparseTargets | None = None,
    *,
    init_from: str | Path | None = None,
    spec: ModelSpec | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    keep_checkpoint: bool = True,
    stop_after: int | None = None,
    manifest: Manifest | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train and save an HF model directory (safetensors + tokenizer, + `memdec.json` if `manifest`).

    `stop_after` ends the run after that many optimizer steps in total, leaving a checkpoint to
    `resume` from; the resumed run follows exactly the trajectory of an uninterrupted one.
    """
    out_dir = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoint"
    run = _plan(config, tokenizer, tokens, targets, init_from, spec)
    _start(run, _find_checkpoint(ckpt_dir) if resume else None)
    end_step = run.total if stop_after is None else min(run.total, stop_after)
    started = time.perf_counter()
    _run_steps(run, end_step, ckpt_dir, progress)
    steps_done = max(run.start_step, end_step)
    seconds = time.perf_counter() - started
    main = distributed.world().is_main
    if steps_done < run.total:
        run.checkpoint(ckpt_dir, steps_done)
        distributed.barrier("saving the training checkpoint")
        return TrainResult(out_dir, steps_done, run.total, False, run.history["losses"], seconds,
                           run.tokens_seen(steps_done))
    if main:
        _save(run, out_dir, tokenizer, manifest)
    if keep_checkpoint:
        run.checkpoint(ckpt_dir, steps_done)
    elif main:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    distributed.barrier("saving the trained memory")
    return TrainResult(out_dir, steps_done, run.total, True, run.history["losses"], seconds,
                       run.tokens_seen(steps_done))


def _plan(
    config: TrainConfig,
    tokenizer: Any,
    tokens: np.ndarray,
    targets: SparseTargets | None,
    init_from: str | Path | None,
    spec: ModelSpec | None,
) -> _Run:
    """Check the inputs, build the starting model, the data and the step schedule."""
    if not 0.0 <= config.beta <= 1.0:
        raise TrainError("beta must be in [0, 1]")
    if config.beta > 0 and targets is None:
        raise TrainError("beta > 0 needs kNN targets; use beta 0 to train a plain language model")
    device = resolve_device(config.device)
    if int(np.asarray(tokens).max()) >= len(tokenizer):
        raise TrainError("the token stream holds ids beyond the tokenizer's vocabulary")
    model = init_model(init_from, spec, tokenizer, config.seed)
    data = TrainData(tokens, targets if config.beta > 0 else None, context_length(model, config.seq_len))
    schedule = Schedule(data.num_sequences, config.batch_size, config.seed)
    w = distributed.world()
    if schedule.batch_size < w.size:
        raise TrainError(f"a micro-batch of {schedule.batch_size} sequences cannot be shared by {w.size} "
                         "processes; raise --train-batch-size (it is the global batch) or launch fewer")
    total = config.max_steps or max(1, math.ceil(config.epochs * schedule.per_epoch / config.grad_accum))
    warmup = int(config.warmup) if config.warmup >= 1 else int(round(config.warmup * total))
    identity = {
        "config": config.trajectory_dict(),
        "init": str(init_from) if init_from is not None else dataclasses.asdict(spec or ModelSpec()),
        "tokens": int(len(tokens)),
        "total_steps": total,
    }
    return _Run(config, model, data, schedule, total, warmup, identity, device, len(tokenizer))


def _start(run: _Run, found: Path | None) -> None:
    """Optimizer and LR schedule, fresh or restored from the checkpoint `found` (with its RNG state, so
    the resumed trajectory is the uninterrupted one)."""
    config = run.config
    if found is not None:
        saved = read_json(found / CHECKPOINT_STATE)
        if saved["run"] != run.identity:
            raise TrainError(
                f"checkpoint {found} was made by a different training run; remove it or pass the same "
                "settings\n"
                f"  checkpoint: {saved['run']}\n  now:        {run.identity}"
            )
        run.model = load_causal_lm(found / "model")
        run.start_step = saved["step"]
        run.history = {"losses": saved["losses"], "kl": saved.get("kl", []), "ce": saved.get("ce", [])}
    move(run.model, run.device)
    run.model.train()
    if distributed.world().distributed:
        from torch.nn.parallel import DistributedDataParallel

        # DDP averages gradients over ranks; each rank's loss is scaled by the world size (in _step) so the
        # average is the sum of the ranks' shares, i.e. the whole micro-batch's gradient.
        on_gpu = run.device.type == "cuda"
        ids = ([run.device.index if run.device.index is not None else torch.cuda.current_device()]
               if on_gpu else None)
        run.ddp = DistributedDataParallel(run.model, device_ids=ids)
    run.optimizer = torch.optim.AdamW(_param_groups(run.model, config.weight_decay), lr=config.lr,
                                      betas=(0.9, 0.95))
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, _lr_lambda(run.total, run.warmup, config.min_lr_ratio)
    )
    if found is not None:
        run.optimizer.load_state_dict(torch.load(found / "optimizer.pt", map_location=run.device,
                                                 weights_only=True))
        run.scheduler.load_state_dict(torch.load(found / "scheduler.pt", weights_only=False))
        _set_rng_state(torch.load(found / "rng.pt", weights_only=False))
    else:
        torch.manual_seed(config.seed)


def _step(run: _Run, step: int) -> tuple[float, float, float]:
    """One optimizer step over `grad_accum` micro-batches: (loss, kl, ce) averaged over them (and over the
    whole micro-batch when ranks share it)."""
    config, vocab = run.config, run.vocab_size
    assert run.optimizer is not None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device.type == "cuda")
    w = distributed.world()
    loss = kl = ce = 0.0
    for a in range(config.grad_accum):
        seqs = run.schedule.micro_batch(step * config.grad_accum + a)
        micro = run.data.batch(np.array_split(seqs, w.size)[w.rank])  # this rank's contiguous share
        batch = {k: v.to(run.device) for k, v in micro.items()}
        totals = _totals(micro, len(seqs) * run.data.seq_len, run) if w.distributed else None
        # DDP all-reduces the gradients at every backward unless told to wait for the last micro-batch.
        wait = run.ddp is not None and a < config.grad_accum - 1
        with run.ddp.no_sync() if wait else contextlib.nullcontext():  # type: ignore[union-attr,operator]
            with autocast:
                logits = (run.ddp or run.model)(input_ids=batch["input_ids"]).logits  # [B, L, V']
            parts = memory_loss(logits[..., :vocab], batch["labels"], batch.get("knn_ids"),
                                batch.get("knn_probs"), config.beta, totals)
            (parts.loss * w.size / config.grad_accum).backward()
        loss += parts.loss.item() / config.grad_accum
        kl += parts.kl.item() / config.grad_accum
        ce += parts.ce.item() / config.grad_accum
    if w.distributed:  # the ranks' shares summed: the whole micro-batches' values, as one process logs them
        shares = torch.tensor([loss, kl, ce], dtype=torch.float64, device=_reduce_device(run))
        loss, kl, ce = distributed.all_sum(shares, "training").cpu().tolist()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, kl, ce


def _totals(micro: dict[str, torch.Tensor], positions: int, run: _Run) -> BatchTotals:
    """The whole micro-batch's counts, from this rank's share and the others' (one small all-reduce)."""
    mine = (micro["knn_probs"].sum(-1) > 0).sum() if "knn_probs" in micro else torch.tensor(0)
    with_target = distributed.all_sum(mine.to(_reduce_device(run), torch.float32), "training")
    return BatchTotals(positions, with_target.to(run.device))


def _reduce_device(run: _Run) -> torch.device:
    """Where collectives on the default group run: NCCL takes CUDA tensors, gloo CPU ones."""
    return run.device if run.device.type == "cuda" else torch.device("cpu")


def _run_steps(run: _Run, end_step: int, ckpt_dir: Path, progress: bool) -> None:
    """Steps start_step..end_step, with a checkpoint every `save_every` steps."""
    history = run.history
    bar = tqdm(total=run.total, initial=run.start_step, desc="train", unit="step",
               disable=not (progress and distributed.world().is_main))
    running = history["losses"][-1] if history["losses"] else None
    for step in range(run.start_step, end_step):
        loss, kl, ce = _step(run, step)
        for key, value in (("losses", loss), ("kl", kl), ("ce", ce)):
            history[key].append(value)
        running = loss if running is None else 0.95 * running + 0.05 * loss
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", ce=f"{ce:.3f}", kl=f"{kl:.3f}",
                        lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
        done = step + 1
        if run.config.save_every and done % run.config.save_every == 0 and done < end_step:
            run.checkpoint(ckpt_dir, done)
    bar.close()


def _save(run: _Run, out_dir: Path, tokenizer: Any, manifest: Manifest | None) -> None:
    """The finished model with its tokenizer, training log and (when given) manifest."""
    config, losses = run.config, run.history["losses"]
    run.model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    run.model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {
        "beta": config.beta,
        "steps": run.total,
        "tokens_seen": run.tokens_seen(run.total),
        "seq_len": run.data.seq_len,
        "batch_size": run.schedule.batch_size,
        "grad_accum": config.grad_accum,
        "lr": config.lr,
        "seed": config.seed,
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(losses[-max(1, len(losses) // 20) :])) if losses else None,
        "init": run.identity["init"],
        "parameters": sum(p.numel() for p in run.model.parameters()),
    }
    write_json(out_dir / "training_log.json", {"summary": summary, "loss": losses, "kl": run.history["kl"],
                                               "ce": run.history["ce"]}, indent=None)
    if manifest is not None:
        write_manifest(out_dir, manifest.replace(training={**manifest.training, **summary}))
