"""Train a memory decoder (or, with β = 0 and no targets, a plain causal LM) on a token stream.

Sequences are consecutive `seq_len` slices of the stream; sequence s covers input positions
[s·L, (s+1)·L), whose labels are the next tokens and whose kNN targets are datastore rows with the
same position numbers. The data order of every epoch is a permutation drawn from (seed, epoch), so
a resumed run finds its place from the step count alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from memories.loss import memory_loss
from memories.manifest import Manifest, tokenizer_fingerprint, write_manifest
from memories.models import load_causal_lm, load_tokenizer, max_length, resolve_device
from memories.targets import SparseTargets

CHECKPOINT_STATE = "trainer_state.json"


class TrainError(ValueError):
    """Training cannot start: inconsistent inputs or a checkpoint from a different configuration."""


@dataclass(frozen=True)
class TrainConfig:
    beta: float = 0.5
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05  # < 1: fraction of the optimizer steps; >= 1: a number of steps
    min_lr_ratio: float = 0.1  # cosine decay ends at lr·min_lr_ratio
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    seed: int = 0
    save_every: int = 200  # optimizer steps between checkpoints (0: only at the end / on stop)
    device: str = "auto"

    def trajectory_dict(self) -> dict[str, Any]:
        """The fields that determine the training trajectory (a checkpoint must match them to resume)."""
        d = dataclasses.asdict(self)
        d.pop("save_every")
        d.pop("device")
        return d


@dataclass(frozen=True)
class ModelSpec:
    """A new memory built from a config, using the base tokenizer."""

    arch: str = "llama"  # llama | qwen2
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 0  # 0: same as heads
    intermediate_size: int = 0  # 0: 8/3·hidden rounded up to a multiple of 32 (Llama's ratio)
    max_len: int = 1024
    tie_embeddings: bool = True


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
    return AutoModelForCausalLM.from_config(config)


def init_model(init_from: str | Path | None, spec: ModelSpec | None, tokenizer: Any, seed: int) -> PreTrainedModel:
    """The memory's starting point: an existing HF directory, or a new model from `spec`."""
    if init_from is not None:
        path = Path(init_from)
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            theirs = tokenizer_fingerprint(load_tokenizer(path))
            if theirs != tokenizer_fingerprint(tokenizer):
                raise TrainError(f"{path} uses a different tokenizer from the base model; cannot be its memory")
        model = load_causal_lm(path)
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            raise TrainError(
                f"{path} has {model.get_input_embeddings().weight.shape[0]} embedding rows, "
                f"fewer than the tokenizer's {len(tokenizer)} tokens"
            )
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
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)  # no decay on biases and norm gains
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
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
    (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
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
    if not 0.0 <= config.beta <= 1.0:
        raise TrainError("beta must be in [0, 1]")
    if config.beta > 0 and targets is None:
        raise TrainError("beta > 0 needs kNN targets; use beta 0 to train a plain language model")
    out_dir = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoint"
    device = resolve_device(config.device)
    vocab = len(tokenizer)
    if int(np.asarray(tokens).max()) >= vocab:
        raise TrainError("the token stream holds ids beyond the tokenizer's vocabulary")

    model = init_model(init_from, spec, tokenizer, config.seed)
    data = TrainData(tokens, targets if config.beta > 0 else None, min(config.seq_len, max_length(model)))
    sched = Schedule(data.num_sequences, config.batch_size, config.seed)
    total = config.max_steps or max(1, math.ceil(config.epochs * sched.per_epoch / config.grad_accum))
    warmup = int(config.warmup) if config.warmup >= 1 else int(round(config.warmup * total))
    run_state = {
        "config": config.trajectory_dict(),
        "init": str(init_from) if init_from is not None else dataclasses.asdict(spec or ModelSpec()),
        "tokens": int(len(tokens)),
        "total_steps": total,
    }

    start_step, losses, kls, ces = 0, [], [], []
    found = _find_checkpoint(ckpt_dir) if resume else None
    if found is not None:
        saved = json.loads((found / CHECKPOINT_STATE).read_text(encoding="utf-8"))
        if saved["run"] != run_state:
            raise TrainError(
                f"checkpoint {found} was made by a different training run; remove it or pass the same settings\n"
                f"  checkpoint: {saved['run']}\n  now:        {run_state}"
            )
        model = load_causal_lm(found / "model")
        start_step, losses = saved["step"], saved["losses"]
        kls, ces = saved.get("kl", []), saved.get("ce", [])
    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup, config.min_lr_ratio))
    if found is not None:
        optimizer.load_state_dict(torch.load(found / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(torch.load(found / "scheduler.pt", weights_only=False))
        _set_rng_state(torch.load(found / "rng.pt", weights_only=False))
    else:
        torch.manual_seed(config.seed)

    def checkpoint(step: int) -> None:
        save_checkpoint(
            ckpt_dir, model, optimizer, scheduler,
            {"run": run_state, "step": step, "losses": losses, "kl": kls, "ce": ces},
        )

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    end_step = total if stop_after is None else min(total, stop_after)
    started = time.perf_counter()
    bar = tqdm(total=total, initial=start_step, desc="train", unit="step", disable=not progress)
    running = losses[-1] if losses else None
    for step in range(start_step, end_step):
        step_loss = step_kl = step_ce = 0.0
        for a in range(config.grad_accum):
            batch = {k: v.to(device) for k, v in data.batch(sched.micro_batch(step * config.grad_accum + a)).items()}
            with autocast:
                logits = model(input_ids=batch["input_ids"]).logits  # [B, L, V']
            parts = memory_loss(
                logits[..., :vocab], batch["labels"], batch.get("knn_ids"), batch.get("knn_probs"), config.beta
            )
            (parts.loss / config.grad_accum).backward()
            step_loss += parts.loss.item() / config.grad_accum
            step_kl += parts.kl.item() / config.grad_accum
            step_ce += parts.ce.item() / config.grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        kls.append(step_kl)
        ces.append(step_ce)
        running = step_loss if running is None else 0.95 * running + 0.05 * step_loss
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", ce=f"{step_ce:.3f}", kl=f"{step_kl:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        done = step + 1
        if config.save_every and done % config.save_every == 0 and done < end_step:
            checkpoint(done)
    bar.close()
    steps_done = max(start_step, end_step)
    finished = steps_done >= total
    seconds = time.perf_counter() - started
    tokens_seen = steps_done * config.grad_accum * sched.batch_size * data.seq_len
    if not finished:
        checkpoint(steps_done)
        return TrainResult(out_dir, steps_done, total, False, losses, seconds, tokens_seen)

    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {
        "beta": config.beta,
        "steps": total,
        "tokens_seen": tokens_seen,
        "seq_len": data.seq_len,
        "batch_size": sched.batch_size,
        "grad_accum": config.grad_accum,
        "lr": config.lr,
        "seed": config.seed,
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(losses[-max(1, len(losses) // 20) :])) if losses else None,
        "init": run_state["init"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out_dir / "training_log.json").write_text(
        json.dumps({"summary": summary, "loss": losses, "kl": kls, "ce": ces}) + "\n", encoding="utf-8"
    )
    if manifest is not None:
        write_manifest(out_dir, manifest.replace(training={**manifest.training, **summary}))
    if keep_checkpoint:
        checkpoint(steps_done)
    else:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return TrainResult(out_dir, steps_done, total, True, losses, seconds, tokens_seen)
