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

from memories.config import (
    DTYPE_CHOICES,
    BuildConfig,
    DatastoreConfig,
    EvalConfig,
    IndexConfig,
    ModelSpec,
    TargetsConfig,
    TrainConfig,
)

DESCRIPTION = """Build a memory decoder for a domain:
  datastore  base-model keys (last-MLP input) and next-token values over a corpus, plus a faiss index
  targets    sparse kNN distributions p_kNN for every datastore position (itself excluded)
  train      train the memory on β·KL(p_kNN ‖ p_mem) + (1−β)·CE (or a plain LM with --beta 0 --corpus)
  eval       held-out perplexity of base, memory and mixture over α; writes the best α to memdec.json
  build      all of the above with cached stages; --holdout-source keeps whole sources out and chooses α \
on them
  alpha      α for a memory built from every source, from leave-one-source-out builds
  router     fit a per-token router (α_t from both models' distributions) on held-out text; "alpha": "auto"
  tokenizer  train a byte-level BPE tokenizer (for base models trained from scratch)
  import     make a published checkpoint (pytorch_model.bin, or safetensors without manifest) a memory"""


class UsageError(ValueError):
    """Inconsistent command-line arguments."""


def _handles_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input (paths, settings, mismatched tokenizers) ends with a one-line message and exit code 2; under
    torchrun the message names the rank, and ranks that lost their peers end with exit code 1."""

    @functools.wraps(fn)
    def wrapper(a: argparse.Namespace) -> int:
        from transformers.utils import logging as hf_logging

        from memories import distributed

        bars_were_on = hf_logging.is_progress_bar_enabled()
        if getattr(a, "quiet", False):
            hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars
        who = f"{distributed.launched()}: " if distributed.launched().distributed else ""
        try:
            if not getattr(fn, "across_processes", False):
                distributed.require_one_process(getattr(a, "memory_command", "this command"))
            return fn(a)
        except distributed.DistributedError as exc:
            print(f"memdec memory: error: {exc}", file=sys.stderr, flush=True)
            if isinstance(exc, distributed.LostPeers):
                distributed.linger()
            return 1
        except (ValueError, FileNotFoundError, OSError) as exc:
            print(f"memdec memory: error: {who}{exc}", file=sys.stderr)
            return 2
        except ImportError as exc:  # a server-only install: faiss and matplotlib come with the extra
            print(f"memdec memory: error: {who}{exc.name} is missing; install memdec[toolkit]",
                  file=sys.stderr)
            return 2
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()

    return wrapper


def _across_processes(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A stage that runs on every rank of a torchrun launch (memories.distributed); in one process without
    it."""

    @functools.wraps(fn)
    def wrapper(a: argparse.Namespace) -> int:
        from memories import distributed

        with distributed.session():
            return fn(a)

    wrapper.across_processes = True  # type: ignore[attr-defined]
    return wrapper


# ---------------------------------------------------------------- argument groups (defaults: memories.config)

DS, IDX, TG, TR, SPEC, EV = (DatastoreConfig(), IndexConfig(), TargetsConfig(), TrainConfig(), ModelSpec(),
                             EvalConfig())


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=DS.device, help="auto (cuda when available), cpu, cuda, cuda:1 …")
    p.add_argument("--dtype", default=DS.dtype, choices=DTYPE_CHOICES,
                   help="base model dtype for the datastore and evaluation (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_datastore(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("datastore")
    g.add_argument("--max-tokens", type=int, default=DS.max_tokens, help="use only the first N corpus tokens")
    g.add_argument("--context", type=int, default=DS.context,
                   help="window length (default 1024 or the base maximum)")
    g.add_argument("--stride", type=int, default=DS.stride, help="window stride (default half the context)")
    g.add_argument("--batch-size", type=int, default=DS.batch_size, help="windows per forward pass")


def _add_index(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("faiss index")
    g.add_argument("--index", default=IDX.kind, choices=["auto", "flat", "ivfpq"],
                   help="auto: exact Flat up to 200k keys, IVF-PQ above")
    g.add_argument("--nlist", type=int, default=IDX.nlist, help="IVF cells (0: about 4·sqrt(N))")
    g.add_argument("--code-size", type=int, default=IDX.code_size,
                   help="PQ bytes per key; must divide the hidden size")
    g.add_argument("--index-train-size", type=int, default=IDX.train_size,
                   help="keys sampled to train IVF-PQ (0: auto)")
    _add_search(g)


def _add_search(g: Any) -> None:
    g.add_argument("--nprobe", type=int, default=IDX.nprobe, help="IVF cells visited per query")
    g.add_argument("--no-gpu-index", action="store_true", help="keep faiss on the CPU even with GPUs")


def _add_targets(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kNN targets")
    g.add_argument("--k", type=int, default=TG.k, help="neighbours per position")
    g.add_argument("--temperature", type=float, default=TG.temperature,
                   help="τ in softmax(−d/τ), d = squared L2 distance between keys")
    g.add_argument("--search-batch", type=int, default=TG.batch_size, help="queries per faiss search call")


def _add_train(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--beta", type=float, default=TR.beta, help="weight of KL(p_kNN ‖ p_mem) against CE")
    g.add_argument("--seq-len", type=int, default=TR.seq_len)
    g.add_argument("--train-batch-size", type=int, default=TR.batch_size, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, default=TR.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=TR.lr)
    g.add_argument("--weight-decay", type=float, default=TR.weight_decay)
    g.add_argument("--warmup", type=float, default=TR.warmup, help="< 1: fraction of steps; >= 1: steps")
    g.add_argument("--min-lr-ratio", type=float, default=TR.min_lr_ratio,
                   help="cosine decay floor, as a fraction of --lr")
    g.add_argument("--max-grad-norm", type=float, default=TR.max_grad_norm)
    g.add_argument("--epochs", type=float, default=TR.epochs)
    g.add_argument("--max-steps", type=int, default=TR.max_steps, help="> 0 overrides --epochs")
    g.add_argument("--seed", type=int, default=TR.seed)
    g.add_argument("--save-every", type=int, default=TR.save_every,
                   help="optimizer steps between checkpoints")
    m = p.add_argument_group("memory model (when not --init-from)")
    m.add_argument("--init-from", default=None, help="start from this HF causal-LM directory")
    m.add_argument("--arch", default=SPEC.arch, choices=["llama", "qwen2"])
    m.add_argument("--hidden-size", type=int, default=SPEC.hidden_size)
    m.add_argument("--layers", type=int, default=SPEC.layers)
    m.add_argument("--heads", type=int, default=SPEC.heads)
    m.add_argument("--kv-heads", type=int, default=SPEC.kv_heads, help="0: same as --heads")
    m.add_argument("--intermediate-size", type=int, default=SPEC.intermediate_size,
                   help="0: 8/3 of the hidden size")
    m.add_argument("--max-len", type=int, default=SPEC.max_len, help="position table size of a new model")
    m.add_argument("--untied", action="store_true", help="separate input and output embeddings")
    m.add_argument("--init-embeddings-from", default=SPEC.embeddings_from, metavar="MODEL",
                   help="start the embedding from MODEL's (the base's), projected onto its top --hidden-size "
                        "singular directions (default: random)")


def _add_eval(p: argparse.ArgumentParser, prefix: str = "") -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument(f"--{prefix}context", dest="eval_context", type=int, default=EV.context,
                   help="window length (default 1024 or the models' maximum)")
    g.add_argument(f"--{prefix}stride", dest="eval_stride", type=int, default=EV.stride,
                   help="default: half the context")
    g.add_argument("--alphas", default=None, help="comma-separated α grid in (0, 1) (default 0.05 … 0.95)")
    g.add_argument("--eval-max-tokens", type=int, default=EV.max_tokens,
                   help="score only the first N tokens of each text")
    g.add_argument("--alpha", type=float, default=EV.alpha,
                   help="recommend this α (e.g. one chosen by leave-one-source-out builds) instead of the "
                        "curves' best")


def _add_manifest(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("manifest")
    g.add_argument("--name", required=required, help="memory name (what clients ask for)")
    g.add_argument("--domain", default=BuildConfig.domain)
    g.add_argument("--description", default=BuildConfig.description)


# ---------------------------------------------------------------- flags -> configs


def _datastore_config(a: argparse.Namespace) -> DatastoreConfig:
    return DatastoreConfig(max_tokens=a.max_tokens, context=a.context, stride=a.stride,
                           batch_size=a.batch_size, dtype=a.dtype, device=a.device)


def _index_config(a: argparse.Namespace) -> IndexConfig:
    """`memory targets` has only the search flags (nprobe, GPU): the others keep their defaults there."""
    return IndexConfig(kind=getattr(a, "index", IDX.kind), nlist=getattr(a, "nlist", IDX.nlist),
                       code_size=getattr(a, "code_size", IDX.code_size), nprobe=a.nprobe,
                       train_size=getattr(a, "index_train_size", IDX.train_size),
                       seed=getattr(a, "seed", IDX.seed), use_gpu=not a.no_gpu_index)


def _targets_config(a: argparse.Namespace) -> TargetsConfig:
    return TargetsConfig(k=a.k, temperature=a.temperature, batch_size=a.search_batch)


def _train_config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        beta=a.beta, seq_len=a.seq_len, batch_size=a.train_batch_size, grad_accum=a.grad_accum, lr=a.lr,
        weight_decay=a.weight_decay, warmup=a.warmup, min_lr_ratio=a.min_lr_ratio,
        max_grad_norm=a.max_grad_norm, epochs=a.epochs, max_steps=a.max_steps, seed=a.seed,
        save_every=a.save_every, device=a.device,
    )


def _spec(a: argparse.Namespace) -> ModelSpec | None:
    if a.init_from:
        return None
    return ModelSpec(arch=a.arch, hidden_size=a.hidden_size, layers=a.layers, heads=a.heads,
                     kv_heads=a.kv_heads, intermediate_size=a.intermediate_size, max_len=a.max_len,
                     tie_embeddings=not a.untied, embeddings_from=a.init_embeddings_from)


def _eval_config(a: argparse.Namespace) -> EvalConfig:
    alphas = EV.alphas if not a.alphas else tuple(float(x) for x in a.alphas.split(",") if x.strip())
    return EvalConfig(context=a.eval_context, stride=a.eval_stride, alphas=alphas,
                      max_tokens=a.eval_max_tokens, alpha=a.alpha)


def _summary(title: str, rows: dict[str, Any]) -> None:
    from memories import distributed

    if not distributed.world().is_main:  # one summary per launch: rank 0's
        return
    print(f"\n== {title}")
    for key, value in rows.items():
        print(f"  {key:<22} {value}")


# ---------------------------------------------------------------- handlers (each runs memories.stages)


@_handles_errors
def cmd_tokenizer(a: argparse.Namespace) -> int:
    from memories.tokenizer import train_tokenizer

    started = time.perf_counter()
    tok = train_tokenizer(a.corpus, a.out, a.vocab_size, a.max_chars, progress=not a.quiet)
    _summary("tokenizer", {"vocab": len(tok), "out": a.out,
                           "seconds": round(time.perf_counter() - started, 1)})
    return 0


@_handles_errors
@_across_processes
def cmd_datastore(a: argparse.Namespace) -> int:
    from memories.stages import Base, datastore_stage, index_stage

    out = Path(a.out)
    ds = datastore_stage(Base(a.base, a.device, a.dtype), a.corpus, out, _datastore_config(a), not a.quiet)
    info = index_stage(out, out, _index_config(a), not a.quiet)  # the index lives beside the keys
    _summary("datastore", {"entries": ds["entries"], "key dim": ds["dim"],
                           "documents": ds["corpus_stats"].get("documents"), "index": info["kind"],
                           "out": a.out, "seconds": ds["seconds"] + info["seconds"]})
    return 0


@_handles_errors
@_across_processes
def cmd_targets(a: argparse.Namespace) -> int:
    from memories.stages import targets_stage

    summary = targets_stage(Path(a.datastore), Path(a.index_dir or a.datastore), Path(a.out),
                            _targets_config(a), _index_config(a), not a.quiet)
    _summary("targets", {k: summary[k] for k in ("num_rows", "k", "temperature", "mean_support", "seconds")})
    return 0


@_handles_errors
@_across_processes
def cmd_train(a: argparse.Namespace) -> int:
    from memories.manifest import Manifest, tokenizer_fingerprint
    from memories.models import load_tokenizer, model_id
    from memories.stages import train_stage

    tok_src = a.tokenizer or a.base
    if tok_src is None:
        raise UsageError("memdec memory train: give --base (the model the memory serves) or --tokenizer")
    tokenizer = load_tokenizer(tok_src)
    manifest = None
    if a.name:
        manifest = Manifest(name=a.name, domain=a.domain, description=a.description,
                            base_model=model_id(a.base) if a.base else None,
                            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    result = train_stage(
        tokenizer, Path(a.out), _train_config(a), datastore=a.datastore and Path(a.datastore),
        targets=a.targets and Path(a.targets), corpus=a.corpus, max_tokens=a.max_tokens,
        init_from=a.init_from, spec=_spec(a), manifest=manifest, checkpoint_dir=a.checkpoint_dir,
        resume=a.resume,
        keep_checkpoint=a.keep_checkpoint, stop_after=a.stop_after, progress=not a.quiet,
    )
    _summary("train", {
        "steps": (f"{result.steps_done}/{result.total_steps}"
                  + ("" if result.finished else " (stopped; --resume)")),
        "loss first→last": f"{result.losses[0]:.4f} → {result.losses[-1]:.4f}" if result.losses else "-",
        "tokens seen": result.tokens_seen, "seconds": round(result.seconds, 1), "out": a.out,
    })
    return 0


def _texts(a: argparse.Namespace) -> list[Any]:
    """`--valid` (in-source) and `--cross-source` texts, each PATH or LABEL=PATH (label: the file's stem)."""
    from memories.crosseval import CROSS_SOURCE, IN_SOURCE, Text

    def text(arg: str, kind: str) -> Text:
        label, sep, path = arg.partition("=")
        return Text(label, path, kind) if sep and label else Text(Path(arg).stem, arg, kind)

    texts = ([text(v, IN_SOURCE) for v in a.valid or []]
             + [text(v, CROSS_SOURCE) for v in a.cross_source or []])
    if not texts:
        raise UsageError("give at least one --valid or --cross-source text")
    return texts


@_handles_errors
def cmd_eval(a: argparse.Namespace) -> int:
    from memories.evaluate import REPORT_JSON, REPORT_PNG, update_manifest
    from memories.manifest import MANIFEST_NAME
    from memories.stages import Base, eval_stage

    report_dir = Path(a.report_dir or a.memory)
    report = eval_stage(Base(a.base, a.device, a.dtype), Path(a.memory), _texts(a), _eval_config(a),
                        report_dir, not a.quiet)
    if not a.no_update_manifest and (Path(a.memory) / MANIFEST_NAME).is_file():
        update_manifest(a.memory, report)
    _print_eval(report, report_dir / REPORT_JSON, report_dir / REPORT_PNG)
    return 0


def _print_eval(report: dict[str, Any], json_path: Any, png_path: Any) -> None:
    """One line per text (base, memory alone, mixture at the recommended α and at its own best α), then
    the recommendation and any warnings."""
    alpha = report["alpha"]
    source = ("given with --alpha" if report["alpha_from"] == "fixed"
              else f"chosen on {report['alpha_from']} text")
    print(f"\n== evaluation (α = {alpha:.2f}, {source})")
    print(f"  {'text':<26} {'kind':<12} {'tokens':>7} {'base':>9} "
          f"{'memory':>9} {'mix@α':>9} {'change':>7} {'best α':>7}")
    for t in report["texts"]:
        at = report["ppl_at_alpha"][t["label"]]
        print(f"  {t['label'][:26]:<26} {t['kind']:<12} {t['tokens_scored']:>7} {t['base_ppl']:>9.2f} "
              f"{t['memory_ppl']:>9.2f} {at:>9.2f} {100 * (at / t['base_ppl'] - 1):>+6.1f}% "
              f"{t['best_alpha']:>7.2f}")
    for w in report["warnings"]:
        print(f"  warning: {w}")
    print(f"  report                 {json_path} {png_path}")


@_handles_errors
def cmd_alpha(a: argparse.Namespace) -> int:
    from memories.crosseval import alpha_from_builds
    from memories.jsonfile import read_json

    print(f"{alpha_from_builds([read_json(Path(p)) for p in a.reports]):.2f}")
    return 0


def _labelled(arg: str) -> tuple[str, str]:
    """[LABEL=]PATH as (label, path); the label defaults to the file's stem (its source's name in the
    demo)."""
    label, sep, path = arg.partition("=")
    return (label, path) if sep and label else (Path(arg).stem, arg)


@_handles_errors
def cmd_router(a: argparse.Namespace) -> int:
    from memories.router_fit import REPORT_JSON, REPORT_PNG, FitConfig, RouterJob, run

    if a.from_dir and a.text:
        raise UsageError("--from takes another memory's router: give no --text to fit on")
    job = RouterJob(
        memory=Path(a.memory), base=a.base, texts=tuple(_labelled(t) for t in a.text or []),
        eval_texts=tuple(_labelled(t) for t in a.eval_text or []),
        from_dir=Path(a.from_dir) if a.from_dir else None,
        max_tokens=a.max_tokens, eval=_eval_config(a), allow_in_source=a.allow_in_source,
        report_dir=Path(a.report_dir) if a.report_dir else None, device=a.device, dtype=a.dtype,
        fit=FitConfig(context_decays=() if a.no_context else FitConfig.context_decays),
    )
    report = run(job, progress=not a.quiet)
    sel = report["fitted"].get("selection")
    print(f"\n== router for {report['memory']} (hidden {report['hidden']}, "
          f"context decays {report['context_decays'] or 'none'}"
          + (f", taken from {report['fitted']['taken_from']})" if "taken_from" in report["fitted"] else ")"))
    if sel:
        print(f"  fitting texts' held-out split ({sel['positions_select']} positions): "
              f"router {sel['select_router_ppl']:.2f}, "
              f"best fixed α {sel['select_best_fixed_alpha']:.2f} {sel['select_best_fixed_ppl']:.2f}, "
              f"start α {report['fitted']['start_alpha']:.2f} {sel['select_start_alpha_ppl']:.2f}")
    print(f"  {'text':<24} {'tokens':>7} {'base':>9} "
          f"{'best α':>7} {'best':>9} {'rec α':>6} "
          f"{'rec':>9} {'router':>9} {'mean α':>7} "
          f"{'×best':>7}")
    for t in report["texts"]:
        print(f"  {t['label'][:24]:<24} {t['tokens_scored']:>7} {t['base_ppl']:>9.2f} "
              f"{t['best_alpha']:>7.2f} {t['best_ppl']:>9.2f} {t['recommended_alpha']:>6.2f} "
              f"{t['recommended_ppl']:>9.2f} {t['router_ppl']:>9.2f} {t['router_mean_alpha']:>7.2f} "
              f"{t['router_vs_best']:>7.3f}")
    out = Path(a.report_dir or a.memory)
    print(f"  saved                    {Path(a.memory) / 'router.safetensors'} (recorded in memdec.json)")
    print(f"  report                   {out / REPORT_JSON} {out / REPORT_PNG}  ({report['seconds']} s)")
    return 0


@_handles_errors
@_across_processes
def cmd_build(a: argparse.Namespace) -> int:
    from memories.build import build

    config = BuildConfig(
        base=a.base, corpus=a.corpus, out=Path(a.out), name=a.name, valid=a.valid,
        work=Path(a.work) if a.work else None, domain=a.domain, description=a.description,
        datastore=_datastore_config(a), index=_index_config(a), targets=_targets_config(a),
        train=_train_config(a), init_from=a.init_from, spec=_spec(a), eval=_eval_config(a),
        sources=a.sources, holdout=tuple(a.holdout_source),
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


@_handles_errors
def cmd_import(a: argparse.Namespace) -> int:
    from memories.importer import import_checkpoint
    from memories.mixing import check_alpha

    result = import_checkpoint(
        a.source, Path(a.out), a.base, name=a.name, domain=a.domain, alpha=check_alpha(a.alpha),
        temperature=a.temperature, description=a.description,
    )
    how = "converted from pickle (weights_only)" if result.converted else "copied"
    _summary(f"memory {a.name or Path(a.out).name} → {a.out}", {
        "weights": f"{', '.join(result.weights)} ({result.num_tensors} tensors, {how})",
        "tokenizer": f"the base's ({a.base})", "manifest": "memdec.json",
    })
    print(f"serve it with: memdec serve --model {a.base} --memory {a.name or Path(a.out).name}={a.out}")
    return 0


# ---------------------------------------------------------------- wiring


def register(subparsers: Any) -> None:
    """Add `memory` with its subcommands to an argparse subparsers object (the `memdec` CLI)."""
    memory = subparsers.add_parser("memory", help="build, train and evaluate domain memories",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = memory.add_subparsers(dest="memory_command", required=True, metavar="COMMAND")
    _register_data_stages(sub)
    _register_model_stages(sub)
    _register_import(sub)


def _temperature(text: str) -> float:
    from memories.mixing import check_temperature

    try:
        return check_temperature(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _register_import(sub: Any) -> None:
    from memories.manifest import PAPER_ALPHA

    p = sub.add_parser(
        "import",
        help="make a published checkpoint (pytorch_model.bin or bare safetensors) a servable memory",
        description="Convert a checkpoint's pickled weights (pytorch_model.bin, read with "
        "torch.load(weights_only=True), which refuses a pickle that carries code) to safetensors, or copy "
        "its safetensors; write the base's tokenizer beside them and a memdec.json manifest with its "
        "fingerprint.",
    )
    p.add_argument("source",
                   help="the checkpoint: a directory or a hub id (org/name[@revision], through the HF cache)")
    p.add_argument("out", help="the memory directory to write (new or empty)")
    p.add_argument("--base", required=True, help="the base model it serves with (its tokenizer is copied)")
    p.add_argument("--name", default=None, help="memory name in the manifest (default: OUT's name)")
    p.add_argument("--domain", default="general")
    p.add_argument("--description", default="")
    p.add_argument("--alpha", type=float, default=PAPER_ALPHA,
                   help=f"default α (default {PAPER_ALPHA}, the paper's for GPT-2)")
    p.add_argument("--temperature", type=_temperature, default=1.0,
                   help="memory temperature: its logits are divided by it before mixing (the reference's "
                        "knn_temp)")
    p.set_defaults(func=cmd_import)


def _register_data_stages(sub: Any) -> None:
    """tokenizer, datastore, targets: the stages before any memory exists."""
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
    _add_search(p)
    p.add_argument("--quiet", action="store_true")
    _add_targets(p)
    p.set_defaults(func=cmd_targets)


def _register_model_stages(sub: Any) -> None:
    """train, eval, and build (every stage, cached)."""
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
    p.add_argument("--device", default=TR.device)
    p.add_argument("--quiet", action="store_true")
    _add_train(p)
    _add_manifest(p, required=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out perplexity of base, memory and mixture; best α")
    p.add_argument("--base", required=True)
    p.add_argument("--memory", required=True)
    p.add_argument("--valid", action="append", default=None, metavar="[LABEL=]PATH",
                   help="in-source held-out text (its source also fed the datastore); repeatable")
    p.add_argument("--cross-source", action="append", default=None, metavar="[LABEL=]PATH",
                   help="text from a source the datastore never saw; repeatable. α is chosen on these when "
                        "given")
    p.add_argument("--report-dir", default=None, help="where evaluation.json/.png go (default: the memory)")
    p.add_argument("--no-update-manifest", action="store_true")
    _add_eval(p)
    _add_device(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("alpha", help="α for an all-source memory, from leave-one-source-out builds' reports",
                       description="Prints the best α of the pooled cross-source curves of several builds "
                                   "made with --holdout-source (their evaluation.json); pass it to a build "
                                   "from every source with --alpha.")
    p.add_argument("reports", nargs="+", metavar="evaluation.json")
    p.set_defaults(func=cmd_alpha)

    p = sub.add_parser("router", help="fit a per-token router for \"alpha\": \"auto\" on held-out text",
                       description="Fit a small router (α_t from both models' next-token distributions at "
                                   "each position) on text from sources the memory's datastore never saw, by "
                                   "the mixture's NLL; compare it with every fixed α on --eval-text; save it "
                                   "in the memory and its memdec.json.")
    p.add_argument("--memory", required=True, help="the memory directory (the router is saved into it)")
    p.add_argument("--base", required=True)
    p.add_argument("--text", action="append", default=None, metavar="[LABEL=]PATH",
                   help="fitting text from a source the datastore never saw (label: its source; default the "
                        "file's stem); repeatable. Its last 20%% chooses among candidate routers")
    p.add_argument("--eval-text", action="append", default=None, metavar="[LABEL=]PATH",
                   help="evaluation text (never fitted on): router vs every fixed α; repeatable")
    p.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                   help="take DIR's router (e.g. a leave-one-source-out build's) instead of fitting one")
    p.add_argument("--max-tokens", type=int, default=None, help="fit on the first N tokens of each --text")
    p.add_argument("--allow-in-source", action="store_true",
                   help="fit on text the manifest records as one of the datastore's sources (warned; not "
                        "advised)")
    p.add_argument("--report-dir", default=None,
                   help="where router-evaluation.json/.png go (default: the memory)")
    p.add_argument("--no-context", action="store_true",
                   help="fit on the 8 distribution features only, without the context features (moving "
                        "averages of the memory's advantage on the preceding tokens, decays 0.9 and 0.99; "
                        "the default)")
    _add_eval(p)
    _add_device(p)
    p.set_defaults(func=cmd_router)

    p = sub.add_parser("build", help="datastore → index → targets → train → eval, cached")
    p.add_argument("--base", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--valid", default=None,
                   help="held-out text for evaluation (skipped when absent); with sources, a file or "
                        "directory like --corpus")
    p.add_argument("--sources", default=None, metavar="JSON|files",
                   help="the corpus's sources: a JSON of line ranges per file (like "
                        "../shared/data/sources.json; --domain picks a domain's entry), or 'files': each "
                        "file of a directory corpus is one")
    p.add_argument("--holdout-source", action="append", default=[], metavar="SOURCE",
                   help="keep this source out of the datastore and choose α on its held-out text; repeatable")
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
