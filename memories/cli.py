"""`memdec memory …`: build, train and evaluate memory decoders from a domain corpus.

`register(subparsers)` adds the `memory` command to the `memdec` CLI; `python -m memories.cli memory …`
runs the same commands on their own.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DESCRIPTION = """Build a memory decoder for a domain:
  datastore  base-model keys (last-MLP input) and next-token values over a corpus, plus a faiss index
  targets    sparse kNN distributions p_kNN for every datastore position (itself excluded)
  train      train the memory on β·KL(p_kNN ‖ p_mem) + (1−β)·CE (or a plain LM with --beta 0 --corpus)
  eval       held-out perplexity of base, memory and mixture over α; writes the best α to memdec.json
  build      all of the above with cached stages
  tokenizer  train a byte-level BPE tokenizer (for base models trained from scratch)"""



class UsageError(ValueError):
    """Inconsistent command-line arguments."""


def _handles_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input (paths, settings, mismatched tokenizers) ends with a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(a: argparse.Namespace) -> int:
        from transformers.utils import logging as hf_logging

        bars_were_on = hf_logging.is_progress_bar_enabled()
        if getattr(a, "quiet", False):
            hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars
        try:
            return fn(a)
        except (ValueError, FileNotFoundError, OSError) as exc:
            print(f"memdec memory: error: {exc}", file=sys.stderr)
            return 2
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()

    return wrapper


# ---------------------------------------------------------------- argument groups


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 …")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="base model dtype for the datastore and evaluation (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_datastore(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("datastore")
    g.add_argument("--max-tokens", type=int, default=None, help="use only the first N corpus tokens")
    g.add_argument("--context", type=int, default=None, help="window length (default 1024 or the base maximum)")
    g.add_argument("--stride", type=int, default=None, help="window stride (default half the context)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")


def _add_index(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("faiss index")
    g.add_argument("--index", default="auto", choices=["auto", "flat", "ivfpq"],
                   help="auto: exact Flat up to 200k keys, IVF-PQ above")
    g.add_argument("--nlist", type=int, default=0, help="IVF cells (0: about 4·sqrt(N))")
    g.add_argument("--code-size", type=int, default=32, help="PQ bytes per key; must divide the hidden size")
    g.add_argument("--nprobe", type=int, default=32, help="IVF cells visited per query")
    g.add_argument("--index-train-size", type=int, default=0, help="keys sampled to train IVF-PQ (0: auto)")
    g.add_argument("--no-gpu-index", action="store_true", help="keep faiss on the CPU even with GPUs")


def _add_targets(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kNN targets")
    g.add_argument("--k", type=int, default=1024, help="neighbours per position")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="τ in softmax(−d/τ), d = squared L2 distance between keys")
    g.add_argument("--search-batch", type=int, default=1024, help="queries per faiss search call")


def _add_train(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--beta", type=float, default=0.5, help="weight of KL(p_kNN ‖ p_mem) against CE")
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--train-batch-size", type=int, default=8, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup", type=float, default=0.05, help="< 1: fraction of steps; >= 1: steps")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay floor, as a fraction of --lr")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=0, help="> 0 overrides --epochs")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=200, help="optimizer steps between checkpoints")
    m = p.add_argument_group("memory model (when not --init-from)")
    m.add_argument("--init-from", default=None, help="start from this HF causal-LM directory")
    m.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    m.add_argument("--hidden-size", type=int, default=256)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=0, help="0: same as --heads")
    m.add_argument("--intermediate-size", type=int, default=0, help="0: 8/3 of the hidden size")
    m.add_argument("--max-len", type=int, default=1024, help="position table size of a new model")
    m.add_argument("--untied", action="store_true", help="separate input and output embeddings")


def _add_eval(p: argparse.ArgumentParser, prefix: str = "") -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument(f"--{prefix}context", dest="eval_context", type=int, default=None,
                   help="window length (default 1024 or the models' maximum)")
    g.add_argument(f"--{prefix}stride", dest="eval_stride", type=int, default=None, help="default: half the context")
    g.add_argument("--alphas", default=None, help="comma-separated α grid in (0, 1) (default 0.05 … 0.95)")
    g.add_argument("--eval-max-tokens", type=int, default=None, help="score only the first N held-out tokens")


def _add_manifest(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("manifest")
    g.add_argument("--name", required=required, help="memory name (what clients ask for)")
    g.add_argument("--domain", default="general")
    g.add_argument("--description", default="")


# ---------------------------------------------------------------- config builders


def _index_config(a: argparse.Namespace):
    from memories.knn import IndexConfig

    return IndexConfig(kind=a.index, nlist=a.nlist, code_size=a.code_size, nprobe=a.nprobe,
                       train_size=a.index_train_size, seed=getattr(a, "seed", 0), use_gpu=not a.no_gpu_index)


def _train_config(a: argparse.Namespace):
    from memories.train import TrainConfig

    return TrainConfig(
        beta=a.beta, seq_len=a.seq_len, batch_size=a.train_batch_size, grad_accum=a.grad_accum, lr=a.lr,
        weight_decay=a.weight_decay, warmup=a.warmup, min_lr_ratio=a.min_lr_ratio, max_grad_norm=a.max_grad_norm,
        epochs=a.epochs, max_steps=a.max_steps, seed=a.seed, save_every=a.save_every, device=a.device,
    )


def _spec(a: argparse.Namespace):
    from memories.train import ModelSpec

    return ModelSpec(arch=a.arch, hidden_size=a.hidden_size, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
                     intermediate_size=a.intermediate_size, max_len=a.max_len, tie_embeddings=not a.untied)


def _eval_config(a: argparse.Namespace):
    from memories.evaluate import DEFAULT_ALPHAS, EvalConfig

    alphas = DEFAULT_ALPHAS if not a.alphas else tuple(float(x) for x in a.alphas.split(",") if x.strip())
    return EvalConfig(context=a.eval_context, stride=a.eval_stride, alphas=alphas)


def _summary(title: str, rows: dict[str, Any]) -> None:
    print(f"\n== {title}")
    for key, value in rows.items():
        print(f"  {key:<22} {value}")


# ---------------------------------------------------------------- handlers


@_handles_errors
def cmd_tokenizer(a: argparse.Namespace) -> int:
    from memories.tokenizer import train_tokenizer

    started = time.perf_counter()
    tok = train_tokenizer(a.corpus, a.out, a.vocab_size, a.max_chars, progress=not a.quiet)
    _summary("tokenizer", {"vocab": len(tok), "out": a.out, "seconds": round(time.perf_counter() - started, 1)})
    return 0


@_handles_errors
def cmd_datastore(a: argparse.Namespace) -> int:
    from memories.corpus import corpus_files, tokenize_corpus
    from memories.datastore import build_datastore
    from memories.knn import build_index, save_index
    from memories.manifest import tokenizer_fingerprint
    from memories.models import (
        load_causal_lm,
        load_tokenizer,
        max_length,
        model_id,
        resolve_device,
        resolve_dtype,
    )

    device = resolve_device(a.device)
    tokenizer = load_tokenizer(a.base)
    model = load_causal_lm(a.base, device, resolve_dtype(a.dtype, device))
    tokens, stats = tokenize_corpus(tokenizer, a.corpus, a.max_tokens, progress=not a.quiet)
    context = min(a.context or 1024, max_length(model))
    ds = build_datastore(
        model, tokens, a.out, context=context, stride=a.stride or max(1, context // 2), batch_size=a.batch_size,
        progress=not a.quiet,
        meta={"base_model": model_id(a.base), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
              "corpus": [str(p) for p in corpus_files(a.corpus)], "corpus_stats": stats.to_dict()},
    )
    index, info = build_index(ds.keys(), _index_config(a), progress=not a.quiet)
    save_index(index, info, a.out)
    _summary("datastore", {"entries": ds.size, "key dim": ds.dim, "documents": stats.documents,
                           "index": info["kind"], "out": a.out, "seconds": ds.meta["seconds"] + info["seconds"]})
    return 0


@_handles_errors
def cmd_targets(a: argparse.Namespace) -> int:
    from memories.datastore import Datastore
    from memories.knn import load_index, set_nprobe, to_gpu_if_available
    from memories.targets import build_targets

    ds = Datastore.open(a.datastore)
    index, info = load_index(a.index_dir or a.datastore)
    set_nprobe(index, a.nprobe)
    index = to_gpu_if_available(index, not a.no_gpu_index)
    tg = build_targets(index, ds.keys(), ds.values(), a.out, k=a.k, temperature=a.temperature,
                       batch_size=a.search_batch, progress=not a.quiet, meta={"index": info, "datastore": a.datastore})
    _summary("targets", {k: tg.meta[k] for k in ("num_rows", "k", "temperature", "mean_support", "seconds")})
    return 0


@_handles_errors
def cmd_train(a: argparse.Namespace) -> int:
    from memories.corpus import tokenize_corpus
    from memories.datastore import Datastore
    from memories.manifest import Manifest, tokenizer_fingerprint
    from memories.models import load_tokenizer, model_id
    from memories.targets import SparseTargets
    from memories.train import train

    tok_src = a.tokenizer or a.base
    if tok_src is None:
        raise UsageError("memdec memory train: give --base (the model the memory serves) or --tokenizer")
    tokenizer = load_tokenizer(tok_src)
    fingerprint = tokenizer_fingerprint(tokenizer)
    targets = None
    if a.datastore:
        ds = Datastore.open(a.datastore)
        if ds.meta.get("tokenizer_fingerprint") not in (None, fingerprint):
            raise UsageError(f"{a.datastore} was built with a different tokenizer")
        tokens = ds.tokens()
        if a.beta > 0:
            if not a.targets:
                raise UsageError("memdec memory train: --beta > 0 needs --targets (or use --beta 0)")
            targets = SparseTargets.open(a.targets)
    elif a.corpus:
        tokens, _ = tokenize_corpus(tokenizer, a.corpus, a.max_tokens, progress=not a.quiet)
    else:
        raise UsageError("memdec memory train: give --datastore/--targets, or --corpus with --beta 0")
    manifest = None
    if a.name:
        manifest = Manifest(name=a.name, domain=a.domain, description=a.description,
                            base_model=model_id(a.base) if a.base else None, tokenizer_fingerprint=fingerprint)
    result = train(
        _train_config(a), a.out, tokenizer, tokens, targets, init_from=a.init_from,
        spec=None if a.init_from else _spec(a), checkpoint_dir=a.checkpoint_dir, resume=a.resume,
        keep_checkpoint=a.keep_checkpoint, stop_after=a.stop_after, manifest=manifest, progress=not a.quiet,
    )
    _summary("train", {
        "steps": f"{result.steps_done}/{result.total_steps}" + ("" if result.finished else " (stopped; --resume)"),
        "loss first→last": f"{result.losses[0]:.4f} → {result.losses[-1]:.4f}" if result.losses else "-",
        "tokens seen": result.tokens_seen, "seconds": round(result.seconds, 1), "out": a.out,
    })
    return 0


@_handles_errors
def cmd_eval(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from memories.corpus import tokenize_corpus
    from memories.evaluate import evaluate, update_manifest, write_report
    from memories.manifest import MANIFEST_NAME, tokenizer_fingerprint
    from memories.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype

    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    tokenizer = load_tokenizer(a.base)
    if tokenizer_fingerprint(load_tokenizer(a.memory)) != tokenizer_fingerprint(tokenizer):
        raise UsageError(f"{a.memory} uses a different tokenizer from {a.base}")
    config = replace(_eval_config(a), max_tokens=a.eval_max_tokens)
    tokens, _ = tokenize_corpus(tokenizer, a.valid, config.max_tokens, progress=False)
    report = evaluate(load_causal_lm(a.base, device, dtype), load_causal_lm(a.memory, device, dtype), tokens,
                      len(tokenizer), config, progress=not a.quiet)
    report["file"] = str(Path(a.valid).resolve())
    json_path, png_path = write_report(report, a.report_dir or a.memory)
    if not a.no_update_manifest and (Path(a.memory) / MANIFEST_NAME).is_file():
        update_manifest(a.memory, report)
    _print_eval(report, json_path, png_path)
    return 0


def _print_eval(report: dict[str, Any], json_path: Any, png_path: Any) -> None:
    _summary("evaluation", {
        "tokens scored": report["tokens_scored"],
        "base ppl": f"{report['base_ppl']:.3f}",
        "memory ppl": f"{report['memory_ppl']:.3f}",
        "best mixture ppl": f"{report['best_ppl']:.3f} at α = {report['best_alpha']}",
        "improvement": f"{report['improvement_pct']:.1f} %",
        "report": f"{json_path} {png_path}",
    })


@_handles_errors
def cmd_build(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from memories.build import BuildConfig, build

    config = BuildConfig(
        base=a.base, corpus=a.corpus, out=Path(a.out), name=a.name, valid=a.valid,
        work=Path(a.work) if a.work else None, domain=a.domain, description=a.description,
        max_tokens=a.max_tokens, context=a.context, stride=a.stride, batch_size=a.batch_size, dtype=a.dtype,
        device=a.device, index=_index_config(a), k=a.k, temperature=a.temperature, search_batch=a.search_batch,
        train=_train_config(a), init_from=a.init_from, spec=None if a.init_from else _spec(a),
        eval=replace(_eval_config(a), max_tokens=a.eval_max_tokens), eval_max_tokens=a.eval_max_tokens,
    )
    started = time.perf_counter()
    records = build(config, progress=not a.quiet)
    rows = {r.name: ("cached" if r.skipped else f"{r.seconds:.1f} s") for r in records}
    rows["total"] = f"{time.perf_counter() - started:.1f} s"
    _summary(f"memory {a.name} → {a.out}", rows)
    ev = next((r for r in records if r.name == "eval"), None)
    if ev is not None:
        _print_eval(ev.summary, Path(a.out) / "evaluation.json", Path(a.out) / "evaluation.png")
    return 0


# ---------------------------------------------------------------- wiring


def register(subparsers: Any) -> None:
    """Add `memory` with its subcommands to an argparse subparsers object (the `memdec` CLI)."""
    memory = subparsers.add_parser("memory", help="build, train and evaluate domain memories",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = memory.add_subparsers(dest="memory_command", required=True, metavar="COMMAND")

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-chars", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("datastore", help="keys/values of the base model over a corpus, and a faiss index")
    p.add_argument("--base", required=True, help="base model: HF directory or cached hub id")
    p.add_argument("--corpus", required=True, help="text file (one document per line) or directory of them")
    p.add_argument("--out", required=True)
    _add_datastore(p)
    _add_index(p)
    _add_device(p)
    p.set_defaults(func=cmd_datastore)

    p = sub.add_parser("targets", help="sparse kNN target distributions for every datastore position")
    p.add_argument("--datastore", required=True)
    p.add_argument("--index-dir", default=None, help="where index.faiss lives (default: the datastore)")
    p.add_argument("--out", required=True)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--no-gpu-index", action="store_true")
    p.add_argument("--quiet", action="store_true")
    _add_targets(p)
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("train", help="train a memory (or a plain LM with --beta 0 --corpus)")
    p.add_argument("--base", default=None, help="base model the memory serves (tokenizer + manifest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --base)")
    p.add_argument("--datastore", default=None)
    p.add_argument("--targets", default=None)
    p.add_argument("--corpus", default=None, help="train on a corpus without targets (needs --beta 0)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint-dir", default=None, help="default: <out>/checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint when there is one")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep the checkpoint after finishing")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (resume later)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    _add_train(p)
    _add_manifest(p, required=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out perplexity of base, memory and mixture; best α")
    p.add_argument("--base", required=True)
    p.add_argument("--memory", required=True)
    p.add_argument("--valid", required=True, help="held-out text file or directory")
    p.add_argument("--report-dir", default=None, help="where evaluation.json/.png go (default: the memory)")
    p.add_argument("--no-update-manifest", action="store_true")
    _add_eval(p)
    _add_device(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("build", help="datastore → index → targets → train → eval, cached")
    p.add_argument("--base", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--valid", default=None, help="held-out file for evaluation (skipped when absent)")
    p.add_argument("--out", required=True, help="the memory directory to write")
    p.add_argument("--work", default=None, help="intermediate files (default: <out>.work)")
    _add_manifest(p, required=True)
    _add_datastore(p)
    _add_index(p)
    _add_targets(p)
    _add_train(p)
    _add_eval(p, prefix="eval-")
    _add_device(p)
    p.set_defaults(func=cmd_build)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memdec", description="memdec toolkit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
