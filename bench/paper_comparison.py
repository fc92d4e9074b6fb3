"""The paper's comparison on the demo's real base: Memory Decoder against kNN-LM, in-context RAG, LoRA and
DAPT, on leave-one-source-out folds, judged on a source none of them saw and on general text, with training
cost and decode latency relative to the base alone (issue 26).

    python -m bench.paper_comparison [--domains legal,biomedical] [--eval-tokens 4096]
                                     [--train-tokens 16384] [--work /work/runs/paper-comparison]
                                     [--recipe /work/runs/demo-recipe]

Base: SmolLM2-135M-Instruct from the demo's GGUF (`server.demo locate`), dequantized to float32, on the
CPU. For each domain, the demo recipe's leave-one-source-out fold
(`<recipe>/loso/<domain>/without-<source>`) gives every method the same data, the fold's datastore token
stream (`datastore/tokens.npy`, 200,000 tokens of the domain's *other* source):

  base           alone.
  knn-lm         p = λ·p_kNN + (1−λ)·p_base over the fold's faiss index (IVF-PQ, the toolkit's keys: the
                 base's last-MLP input; p_kNN by the toolkit's `memories.targets.knn_distribution`, PQ
                 distances); k ∈ {256, 1024}, τ and λ chosen on the held-out source's valid lines (the
                 tune slice).
  rag            in-context RAG: a BM25 index (bm25s) over the fold's datastore tokens cut into passages
                 (≤ `--passage-tokens`, documents never joined); the top passage for the last 32 tokens is
                 prepended to the window. On the whole slices a passage is retrieved every `--rag-every`
                 tokens (cheaper than the paper's every 4); the paper's setting (every 4 tokens) is scored
                 on a sample (`--rag-paper-tokens` tokens of the held-out slice) and reported beside it.
  lora           peft on q,k,v,o,gate,up,down, rank so its trainable parameters ≈ the memory's; CE on the
                 first `--train-tokens` datastore tokens, one epoch, seeded.
  dapt           every base weight fine-tuned, CE on the same tokens.
  memdec         the fold's memory at its recommended α (memdec.json), and `memdec-router`: with its router.

Perplexity: the toolkit's protocol (memories.perplexity: windows 1024, stride 512, each token scored once) on
three fixed slices: `heldout` = the first `--eval-tokens` tokens of the held-out source's *train* lines of
../shared/data (fresh: nothing is tuned on them), `general` = the first `--eval-tokens` of
general/valid.txt, and `tune` = the first `--tune-tokens` of the held-out source's valid lines (kNN-LM's λ,
τ, k; memdec's α was chosen there by the recipe). Training CPU-seconds: measured here (process CPU time)
for LoRA, DAPT and BM25; memdec's (datastore + index + targets + train) and kNN-LM's (datastore + index)
are the fold's recorded stage seconds, wall-clock (the recipe ran its three domains at once, one thread
each, on 2 cores: an upper bound on CPU time).

Latency per generated token relative to the base alone, greedy, EOS ignored, 32-token prompts from the
held-out source's valid lines, batch 1 and 8, the median of `--repeats` CPU-time runs, every configuration
round-robin in one run: the base, memdec (α and router), the merged LoRA and the DAPT model through
memdec's engine (each ratio against the base in that engine); kNN-LM and RAG (paper setting: every 4
tokens on the last 32, the passage prepended and the window re-encoded) in one transformers KV-cache loop,
against the base in that same loop.

Everything expensive is cached under `--work` (resumable); results go to
bench/results/paper_comparison.json and a summary table is printed at the end. Run it with one thread
(`OMP_NUM_THREADS=1`; the bench also sets torch's and faiss' thread counts to `--threads`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import ROOT, write_result

DATA = ROOT.parent / "shared" / "data"
RECIPE = Path("/work/runs/demo-recipe")
WORK = Path("/work/runs/paper-comparison")
METHODS = ("base", "knn-lm", "rag", "lora", "dapt", "memdec", "memdec-router")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONTEXT, STRIDE = 1024, 512  # the paper's perplexity protocol
QUERY_TOKENS = 32  # the paper's RAG query: the last 32 tokens
PAPER_RAG_EVERY = 4  # the paper's retrieval stride
KNN_KS = (256, 1024)
KNN_TAUS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
KNN_LAMBDAS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.0f} s] {msg}", flush=True)


def ppl(logprobs: torch.Tensor | np.ndarray) -> float:
    return math.exp(-float(torch.as_tensor(logprobs).double().mean()))


def cached(path: Path, label: str, compute: Callable[[], Any]) -> Any:
    """torch.load(path) when a previous run saved it, else compute (saying `label`), save atomically,
    return."""
    if path.is_file():
        return torch.load(path, weights_only=False)
    log(f"  {label}")
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(value, tmp)
    tmp.replace(path)
    return value


# ---------------------------------------------------------------- data


def token_stream(tokenizer: Any, docs: Sequence[str], max_tokens: int) -> np.ndarray:
    """Documents as one int64 stream, EOS after each (the toolkit's corpus convention), cut at max_tokens."""
    out: list[int] = []
    for doc in docs:
        out += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(out) >= max_tokens:
            break
    return np.asarray(out[:max_tokens], dtype=np.int64)


def source_docs(data: Path, domain: str, split: str, source: str) -> list[str]:
    from memories.sources import load_spec, read_sources

    path = data / domain / f"{split}.txt"
    return read_sources(path, load_spec(data / "sources.json", domain)).docs[source]


def find_fold(recipe: Path, domain: str) -> tuple[str, Path, Path]:
    """(held-out source, memory dir, its .work dir) of the domain's leave-one-source-out fold."""
    folds = sorted(p for p in (recipe / "loso" / domain).glob("without-*")
                   if p.is_dir() and p.suffix != ".work")
    if len(folds) != 1:
        raise SystemExit(f"expected one fold under {recipe / 'loso' / domain}, "
                         f"found {[p.name for p in folds]}")
    fold = folds[0]
    return fold.name.removeprefix("without-"), fold, fold.with_name(fold.name + ".work")


def passages(tokens: np.ndarray, eos: int, size: int) -> list[np.ndarray]:
    """The datastore stream cut into passages of at most `size` tokens (EOS included), never across
    documents."""
    out: list[np.ndarray] = []
    ends = np.flatnonzero(tokens == eos)
    start = 0
    for end in [*ends.tolist(), len(tokens) - 1]:
        doc = tokens[start : end + 1]
        start = end + 1
        for i in range(0, len(doc), size):
            if len(doc[i : i + size]):
                out.append(np.asarray(doc[i : i + size], dtype=np.int64))
    return out


# ---------------------------------------------------------------- base pass (base, memdec, kNN keys)


@torch.inference_mode()
def base_pass(base: torch.nn.Module, memory: torch.nn.Module, ids: np.ndarray, vocab: int,
              mem_temperature: float) -> dict[str, torch.Tensor]:
    """One walk of the protocol's windows: per scored position (text order), the base's and the memory's
    target log-probs, the router's distribution features and the base's last-MLP input (the kNN-LM query).

    The key predicting ids[t] is the hidden state at position t − 1, as the datastore stores it."""
    from memories.hooks import capture_mlp_input
    from memories.perplexity import batch_distributions, sliding_windows, window_batches
    from memories.router import features

    t = torch.as_tensor(ids)
    xs, bs, ms, keys = [], [], [], []
    with capture_mlp_input(base) as capture:
        for batch in window_batches(sliding_windows(len(t), CONTEXT, STRIDE), max_windows=1):
            w = batch[0]
            b = batch_distributions(base, t, batch, vocab)  # [1, S, V]
            hidden = capture.take()[0]  # [T, H]
            m = batch_distributions(memory, t, batch, vocab, mem_temperature)
            target = t[w.score_from : w.end].view(1, -1, 1)
            xs.append(features(b, m)[0])
            bs.append(b.gather(-1, target).flatten())
            ms.append(m.gather(-1, target).flatten())
            keys.append(hidden[w.score_from - 1 - w.begin : w.end - 1 - w.begin].to(torch.float16))
    return {"x": torch.cat(xs), "base": torch.cat(bs), "memory": torch.cat(ms), "keys": torch.cat(keys),
            "targets": t[1:].clone()}


def memdec_ppls(scored: dict[str, torch.Tensor], router: Any, alpha: float) -> dict[str, float]:
    """Fixed-α and routed perplexity, by the toolkit's router evaluation (its context features included)."""
    from memories.router_fit import Scored, evaluate_router

    s = Scored("slice", scored["x"], scored["base"], scored["memory"], CONTEXT, STRIDE)
    rep = evaluate_router(router, s, [alpha], alpha)
    return {"base": rep["base_ppl"], "memdec": rep["recommended_ppl"], "memdec-router": rep["router_ppl"],
            "memory_alone": rep["memory_ppl"], "router_mean_alpha": rep["router_mean_alpha"]}


# ---------------------------------------------------------------- kNN-LM


def knn_search(index: Any, keys: torch.Tensor, values: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """k nearest datastore entries of each query key: squared-L2 distances [Q, k] and ids [Q, k] (−1 =
    none)."""
    dists, ids = index.search(np.ascontiguousarray(keys.float().numpy()), k)
    dists[ids < 0] = np.inf
    return {"dists": dists.astype(np.float32), "ids": ids.astype(np.int64)}


def knn_target_logprob(dists: np.ndarray, ids: np.ndarray, values: np.ndarray, targets: np.ndarray,
                       tau: float) -> torch.Tensor:
    """log p_kNN(target) per row, p_kNN by the toolkit's `knn_distribution` (softmax(−d/τ) summed per
    token)."""
    from memories.targets import knn_distribution

    counts, tokens, probs = knn_distribution(dists, ids, values, tau)
    rows = np.repeat(np.arange(len(counts)), counts)
    hit = tokens == targets[rows]
    p = np.zeros(len(counts), dtype=np.float64)
    np.add.at(p, rows[hit], probs[hit])
    with np.errstate(divide="ignore"):
        return torch.from_numpy(np.log(p)).float()


def knn_mix(base_lp: torch.Tensor, knn_lp: torch.Tensor, lam: float) -> torch.Tensor:
    """log(λ·p_kNN + (1 − λ)·p_base): the toolkit's mixture with the kNN distribution as the 'memory'."""
    from memories.mixing import mix_logprobs

    return mix_logprobs(base_lp, knn_lp, lam)


def knn_sweep(base_lp: torch.Tensor, nb: dict[str, np.ndarray], values: np.ndarray, targets: np.ndarray
              ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The (k, τ, λ) of the grid with the lowest perplexity: (best, every point)."""
    grid = []
    for k in KNN_KS:
        for tau in KNN_TAUS:
            knn_lp = knn_target_logprob(nb["dists"][:, :k], nb["ids"][:, :k], values, targets, tau)
            for lam in KNN_LAMBDAS:
                grid.append({"k": k, "tau": tau, "lambda": lam, "ppl": ppl(knn_mix(base_lp, knn_lp, lam))})
    return min(grid, key=lambda r: r["ppl"]), grid


# ---------------------------------------------------------------- RAG


class BM25Retriever:
    """bm25s over passages' text (the base tokenizer's decoding of the datastore's own tokens)."""

    def __init__(self, tokenizer: Any, chunks: list[np.ndarray]) -> None:
        import bm25s

        self.tokenizer, self.chunks = tokenizer, chunks
        c0 = time.process_time()
        texts = tokenizer.batch_decode([c.tolist() for c in chunks], skip_special_tokens=True)
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        self.index_cpu_s = time.process_time() - c0

    def __call__(self, queries: list[list[int]]) -> list[np.ndarray]:
        """The top passage (token ids) for each query (token ids)."""
        import bm25s

        texts = self.tokenizer.batch_decode(queries, skip_special_tokens=True)
        tok = bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)
        # an all-stopword query still retrieves (the ranking is arbitrary)
        tok = [q if q else ["the"] for q in tok]
        found, _ = self.bm25.retrieve(tok, k=1, show_progress=False, n_threads=1)
        return [self.chunks[int(i)] for i in found[:, 0]]


def rag_blocks(num_tokens: int, every: int, first: int = 1, last: int | None = None) -> list[tuple[int, int]]:
    """[b, e) blocks covering positions first..last−1 (each scored once), `every` tokens each."""
    last = num_tokens if last is None else last
    return [(b, min(b + every, last)) for b in range(first, last, every)]


@torch.inference_mode()
def rag_logprobs(model: torch.nn.Module, ids: np.ndarray, blocks: list[tuple[int, int]],
                 retrieved: list[np.ndarray], vocab: int, context: int = CONTEXT) -> torch.Tensor:
    """log p(ids[t] | passage + ids[s:t]) for t in each block [b, e), the block's passage prepended and as
    much left context s..b as the window (`context` tokens in all) leaves. Only the block's own tokens are
    scored: never the passage's, never a token twice. Returns [Σ (e − b)] in block order."""
    t = torch.as_tensor(ids)
    out = []
    for (b, e), passage in zip(blocks, retrieved, strict=True):
        keep = context - len(passage) - (e - b)
        if keep < 1:
            raise ValueError(f"a {len(passage)}-token passage and a {e - b}-token block leave no context")
        s = max(0, b - keep)
        inp = torch.cat([torch.as_tensor(passage, dtype=torch.long), t[s:e]]).unsqueeze(0)  # [1, L]
        # The last e − b + 1 positions hold the predictions of ids[b..e] (the very last, of ids[e], is
        # dropped).
        logits = model(input_ids=inp, logits_to_keep=e - b + 1).logits[0, :-1, :vocab].float()  # [e − b, V]
        out.append(torch.log_softmax(logits, -1).gather(-1, t[b:e].unsqueeze(-1)).squeeze(-1))
    return torch.cat(out)


def rag_queries(ids: np.ndarray, blocks: list[tuple[int, int]]) -> list[list[int]]:
    return [ids[max(0, b - QUERY_TOKENS) : b].tolist() for b, _ in blocks]


# ---------------------------------------------------------------- LoRA / DAPT


def lora_parameters(model: torch.nn.Module, rank: int, targets: Sequence[str] = LORA_TARGETS) -> int:
    """Trainable parameters of LoRA at `rank` on the named linear layers: rank·(in + out) per layer."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def lora_rank_for(model: torch.nn.Module, params: int, targets: Sequence[str] = LORA_TARGETS) -> int:
    """The rank whose LoRA parameter count is closest to `params`."""
    per_rank = lora_parameters(model, 1, targets)
    low = max(1, params // per_rank)
    return min((low, low + 1), key=lambda r: abs(r * per_rank - params))


def train_ce(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int, lr: float,
             seed: int) -> dict[str, Any]:
    """One epoch of next-token CE on `tokens` cut into seq_len sequences (shuffled, seeded); AdamW, 10%
    linear warmup then linear decay to 0, gradients clipped at 1. Returns the loss curve and the CPU-seconds
    spent."""
    torch.manual_seed(seed)
    n = len(tokens) // seq_len
    seqs = torch.as_tensor(tokens[: n * seq_len]).view(n, seq_len)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    steps = math.ceil(n / batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warm, (steps - i) / (steps - warm + 1)))
    model.train()
    losses = []
    c0, w0 = time.process_time(), time.perf_counter()
    for step in range(steps):
        x = seqs[order[step * batch_size : (step + 1) * batch_size]]  # [B, L]
        # transformers shifts the labels: each token predicts the next
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 4 == 0 or step == steps - 1:
            log(f"    step {step + 1}/{steps} loss {losses[-1]:.3f}")
    model.eval()
    return {"steps": steps, "tokens": n * seq_len, "seq_len": seq_len, "batch_size": batch_size, "lr": lr,
            "seed": seed, "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
            "train_cpu_s": time.process_time() - c0, "train_wall_s": time.perf_counter() - w0}


# ---------------------------------------------------------------- latency


def engine_decode(engine: Any, prompts: list[tuple[int, ...]], tokens: int, memory: str | None, alpha: float,
                  routed: bool) -> float:
    """CPU seconds memdec's engine spends decoding `tokens` − 1 tokens per sequence after the prefill (greedy,
    EOS ignored). The one place this bench touches the engine's request types (being refactored)."""
    from bench.speculative import decode_seconds

    if not routed:
        return decode_seconds(engine, prompts, tokens, memory, alpha, 0.0)[1]
    from memories.mixing import Mixture
    from server.request import GenerationRequest, SamplingParams

    assert memory is not None
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=tokens, temperature=0.0, seed=i, ignore_eos=True)
        engine.add_request(GenerationRequest(f"r{i}", p, params, Mixture.auto(memory)))
    engine.step()  # prefill
    c0 = time.process_time()
    while engine.has_unfinished():
        engine.step()
    return time.process_time() - c0


@torch.inference_mode()
def hf_decode(model: torch.nn.Module, prompts: list[tuple[int, ...]], tokens: int, vocab: int,
              knn: dict[str, Any] | None = None, rag: BM25Retriever | None = None) -> float:
    """CPU seconds of a greedy transformers KV-cache loop decoding `tokens` − 1 tokens per sequence after the
    prefill: the base alone, or with kNN-LM (each step's last-MLP input searched, p_kNN mixed in), or with RAG
    (every 4 tokens the last 32 are a BM25 query and the window is re-encoded behind the new passage)."""
    from memories.hooks import capture_mlp_input
    from memories.targets import knn_distribution

    ids = torch.tensor(prompts)  # [B, P]
    with capture_mlp_input(model) as capture:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        # key: [B, H]
        past, logits, key = out.past_key_values, out.logits[:, -1, :vocab], capture.take()[:, -1]
        seqs = ids
        c0 = time.process_time()
        for step in range(tokens - 1):
            if knn is not None:  # p = λ·p_kNN + (1 − λ)·p_base over the whole vocabulary, then greedy
                nb = knn_search(knn["index"], key, knn["values"], knn["k"])
                p = torch.softmax(logits.float(), -1) * (1 - knn["lambda"])
                counts, toks, probs = knn_distribution(nb["dists"], nb["ids"], knn["values"], knn["tau"])
                rows = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
                p.index_put_((rows, torch.from_numpy(toks.astype(np.int64))),
                             torch.from_numpy(probs) * knn["lambda"], accumulate=True)
                logits = p
            nxt = logits.argmax(-1, keepdim=True)  # [B, 1]
            seqs = torch.cat([seqs, nxt], 1)
            # new passage: re-encode the window behind it
            if rag is not None and (step + 1) % PAPER_RAG_EVERY == 0:
                passage = torch.as_tensor(rag([seqs[0, -QUERY_TOKENS:].tolist()])[0])
                inp = torch.cat([passage, seqs[0, -(CONTEXT - len(passage)) :]]).unsqueeze(0)
                out = model(input_ids=inp, use_cache=True, logits_to_keep=1)
            else:
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, logits, key = out.past_key_values, out.logits[:, -1, :vocab], capture.take()[:, -1]
        return time.process_time() - c0


# ---------------------------------------------------------------- one domain


def slice_logprobs(model: torch.nn.Module, ids: np.ndarray, vocab: int) -> torch.Tensor:
    """Every scored token's log-prob under `model` in the protocol's windows (text order)."""
    from memories.perplexity import document_logprobs

    return torch.cat([b[0].cpu()
                      for b in document_logprobs([model], torch.as_tensor(ids), CONTEXT, STRIDE, vocab)])


def run_domain(domain: str, a: argparse.Namespace, base_path: str) -> dict[str, Any]:
    import faiss

    from memories.datastore import Datastore
    from memories.knn import set_nprobe
    from memories.mixing import mix_logprobs
    from memories.models import load_causal_lm, load_tokenizer
    from memories.router import load_router

    source, fold, work_dir = find_fold(a.recipe, domain)
    manifest = json.loads((fold / "memdec.json").read_text())
    alpha, mem_temp = float(manifest["alpha"]), float(manifest.get("temperature", 1.0))
    out = a.work / domain
    out.mkdir(parents=True, exist_ok=True)
    log(f"{domain}: held-out source {source}, fold {fold}, α {alpha}")
    tok = load_tokenizer(base_path)
    vocab = len(tok)
    base = load_causal_lm(base_path)
    memory = load_causal_lm(fold)
    router = load_router(fold, manifest.get("router"))
    ds = Datastore.open(work_dir / "datastore")
    values = np.asarray(ds.values(), dtype=np.int64)
    ds_tokens = np.asarray(ds.tokens(), dtype=np.int64)
    slices = {
        "heldout": token_stream(tok, source_docs(a.data, domain, "train", source), a.eval_tokens),
        "general": token_stream(tok, (a.data / "general" / "valid.txt").read_text().splitlines(),
                                a.eval_tokens),
        "tune": token_stream(tok, source_docs(a.data, domain, "valid", source), a.tune_tokens),
    }
    for name, ids in slices.items():
        log(f"  slice {name}: {len(ids)} tokens")
    res: dict[str, Any] = {"heldout_source": source, "fold": str(fold), "alpha": alpha,
                           "slices": {k: len(v) for k, v in slices.items()},
                           "methods": {m: {} for m in METHODS}}
    M = res["methods"]

    # base, memdec, memdec-router; kNN-LM's queries
    scored: dict[str, dict[str, torch.Tensor]] = {}
    for name, ids in slices.items():
        scored[name] = cached(out / f"pass-{name}.pt", f"base pass {name}",
                              partial(base_pass, base, memory, ids, vocab, mem_temp))
    for name in ("heldout", "general"):
        p = memdec_ppls(scored[name], router, alpha)
        for m in ("base", "memdec", "memdec-router"):
            M[m][f"{name}_ppl"] = p[m]
        M["memdec"][f"{name}_memory_alone_ppl"] = p["memory_alone"]
        M["memdec-router"][f"{name}_mean_alpha"] = p["router_mean_alpha"]
    log(f"  base {M['base']['heldout_ppl']:.2f}/{M['base']['general_ppl']:.2f}  "
        f"memdec {M['memdec']['heldout_ppl']:.2f}/{M['memdec']['general_ppl']:.2f}  "
        f"router {M['memdec-router']['heldout_ppl']:.2f}/{M['memdec-router']['general_ppl']:.2f}")
    stages = {s: json.loads((work_dir / "stages" / f"{s}.json").read_text())["seconds"]
              for s in ("datastore", "index", "targets", "train")}
    M["base"]["train_cpu_s"] = 0.0
    M["memdec"]["train_cpu_s"] = M["memdec-router"]["train_cpu_s"] = sum(stages.values())
    M["memdec"]["stage_seconds"] = stages
    M["memdec"]["alpha"] = alpha
    M["memdec"]["train_tokens_seen"] = json.loads(
        (work_dir / "stages" / "train.json").read_text())["summary"]["tokens_seen"]
    M["memdec-router"]["note"] = "router fit time (routers.sh, 20k tokens) not included"

    # kNN-LM
    index = faiss.read_index(str(work_dir / "index" / "index.faiss"))
    set_nprobe(index, a.nprobe)
    kmax = max(KNN_KS)
    nbs: dict[str, dict[str, np.ndarray]] = {}
    for name in slices:
        nbs[name] = cached(out / f"knn-{name}.pt", f"kNN search {name} (k={kmax})",
                           partial(knn_search, index, scored[name]["keys"], values, kmax))
    best, grid = knn_sweep(scored["tune"]["base"], nbs["tune"], values, scored["tune"]["targets"].numpy())
    log(f"  kNN-LM tuned on {source} valid: k {best['k']} τ {best['tau']} λ {best['lambda']} "
        f"({best['ppl']:.2f}; "
        f"base {ppl(scored['tune']['base']):.2f})")
    for name in ("heldout", "general"):
        nb = nbs[name]
        knn_lp = knn_target_logprob(nb["dists"][:, : best["k"]], nb["ids"][:, : best["k"]], values,
                                    scored[name]["targets"].numpy(), best["tau"])
        M["knn-lm"][f"{name}_ppl"] = ppl(knn_mix(scored[name]["base"], knn_lp, best["lambda"]))
        # The paper's λ = 0.25 at the tuned k, τ, for reference.
        M["knn-lm"][f"{name}_ppl_lambda_0.25"] = ppl(knn_mix(scored[name]["base"], knn_lp, 0.25))
    M["knn-lm"].update(k=best["k"], tau=best["tau"], **{"lambda": best["lambda"]}, tune_ppl=best["ppl"],
                       nprobe=a.nprobe, train_cpu_s=stages["datastore"] + stages["index"],
                       sweep=grid)
    log(f"  kNN-LM {M['knn-lm']['heldout_ppl']:.2f}/{M['knn-lm']['general_ppl']:.2f}")

    # RAG
    chunks = passages(ds_tokens, tok.eos_token_id, a.passage_tokens)
    retriever = BM25Retriever(tok, chunks)
    M["rag"].update(train_cpu_s=retriever.index_cpu_s, passages=len(chunks), passage_tokens=a.passage_tokens,
                    every=a.rag_every, query_tokens=QUERY_TOKENS)

    def rag_slice(name: str, every: int, first: int = 1, last: int | None = None) -> torch.Tensor:
        ids = slices[name]
        blocks = rag_blocks(len(ids), every, first, last)
        log(f"  RAG {name}: every {every}, {len(blocks)} blocks")
        return rag_logprobs(base, ids, blocks, retriever(rag_queries(ids, blocks)), vocab)

    rag_lp: dict[str, torch.Tensor] = {}
    for name in ("heldout", "general"):
        rag_lp[name] = cached(out / f"rag-{name}-every{a.rag_every}.pt", f"RAG {name}",
                              partial(rag_slice, name, a.rag_every))
    for name, lp in rag_lp.items():
        M["rag"][f"{name}_ppl"] = ppl(lp)
    log(f"  RAG {M['rag']['heldout_ppl']:.2f}/{M['rag']['general_ppl']:.2f}")
    if a.rag_paper_tokens:
        first = min(CONTEXT, len(slices["heldout"]) - a.rag_paper_tokens)  # where base windows are full
        last = first + a.rag_paper_tokens
        paper = cached(out / f"rag-paper-{first}-{last}.pt", "RAG, the paper's setting",
                       lambda: rag_slice("heldout", PAPER_RAG_EVERY, first, last))
        sl = slice(first - 1, last - 1)  # scored arrays start at position 1
        M["rag"]["paper_setting_sample"] = {
            "positions": [first, last], "every": PAPER_RAG_EVERY, "rag_paper_ppl": ppl(paper),
            "rag_cheap_ppl": ppl(rag_lp["heldout"][sl]), "base_ppl": ppl(scored["heldout"]["base"][sl]),
            "memdec_ppl": ppl(mix_logprobs(scored["heldout"]["base"][sl], scored["heldout"]["memory"][sl],
                                           alpha)),
        }
        log(f"  RAG paper setting on {a.rag_paper_tokens} tokens: {M['rag']['paper_setting_sample']}")

    # LoRA and DAPT
    train_tokens = ds_tokens[: a.train_tokens + 1]
    mem_params = int(manifest["training"]["parameters"])
    for method in ("lora", "dapt"):
        model_dir = out / method
        meta_path = out / f"{method}.json"
        if not meta_path.is_file():
            log(f"  training {method} on {len(train_tokens) - 1} tokens")
            model: Any = load_causal_lm(base_path)
            if method == "lora":
                from peft import LoraConfig, get_peft_model

                rank = lora_rank_for(model, mem_params)
                cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                 target_modules=list(LORA_TARGETS))
                model = get_peft_model(model, cfg)
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                stats = train_ce(model, train_tokens, a.seq_len, a.batch_size, a.lora_lr, a.seed)
                stats.update(rank=rank, lora_alpha=2 * rank, trainable_parameters=trainable,
                             memory_parameters=mem_params)
                model = model.merge_and_unload()
            else:
                stats = train_ce(model, train_tokens, a.seq_len, a.batch_size, a.dapt_lr, a.seed)
                stats["trainable_parameters"] = sum(p.numel() for p in model.parameters())
            model.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
            meta_path.write_text(json.dumps(stats, indent=2))
            del model
        stats = json.loads(meta_path.read_text())
        tuned = load_causal_lm(model_dir)
        for name in ("heldout", "general"):
            lp = cached(out / f"lp-{method}-{name}.pt", f"{method} perplexity {name}",
                        partial(slice_logprobs, tuned, slices[name], vocab))
            M[method][f"{name}_ppl"] = ppl(lp)
        M[method].update({k: v for k, v in stats.items() if k != "losses"})
        log(f"  {method} {M[method]['heldout_ppl']:.2f}/{M[method]['general_ppl']:.2f} "
            f"({stats['train_cpu_s']:.0f} CPU-s)")
        del tuned

    # latency
    lat_path = out / f"latency-{a.latency_tokens}x{a.repeats}.json"
    if not lat_path.is_file():
        knn_cfg = {"index": index, "values": values, "k": best["k"], "tau": best["tau"],
                   "lambda": best["lambda"]}
        lat = latency(base_path, fold, manifest["name"], alpha, out, tok, vocab, knn_cfg, retriever, a,
                      source_docs(a.data, domain, "valid", source))
        lat_path.write_text(json.dumps(lat, indent=2))
    lat = json.loads(lat_path.read_text())
    for m in METHODS:
        M[m]["latency_ratio"] = lat["ratio"][m]
        M[m]["latency_ratio_b8"] = lat["ratio_b8"].get(m)
    res["latency"] = lat
    (out / "result.json").write_text(json.dumps(res, indent=2))
    return res


def latency(base_path: str, fold: Path, memory_name: str, alpha: float, out: Path, tok: Any, vocab: int,
            knn_cfg: dict[str, Any], retriever: BM25Retriever, a: argparse.Namespace,
            prompt_docs: list[str]) -> dict[str, Any]:
    """Per-token decode CPU time of every method, round-robin, at batch 1 and 8; ratios to the base alone in
    the same code path (engine or transformers loop)."""
    from server.config import EngineConfig, ModelConfig
    from server.engine import Engine
    from server.loader import load_base
    from server.registry import MemoryRegistry

    log("  latency")
    prompts = [tuple(ids[:QUERY_TOKENS])
               for ids in (tok(d, add_special_tokens=False)["input_ids"] for d in prompt_docs)
               if len(ids) >= QUERY_TOKENS][:8]
    cfg = EngineConfig(max_num_seqs=8, speculative_tokens=0)
    # Float32, as the transformers loop the kNN-LM and RAG rows run in (and LoRA/DAPT's merged safetensors).
    base = load_base(ModelConfig(base_path, quantization="none"))
    registry = MemoryRegistry(base)
    registry.load("mem", str(fold), alpha)
    engines = {"base": Engine(base, registry, cfg)}
    for method in ("lora", "dapt"):
        loaded = load_base(ModelConfig(str(out / method), quantization="none"))
        engines[method] = Engine(loaded, MemoryRegistry(loaded), cfg)
    runs: dict[str, Callable[[list[tuple[int, ...]]], float]] = {
        "engine:base": lambda p: engine_decode(engines["base"], p, a.latency_tokens, None, 0.0, False),
        "engine:memdec": lambda p: engine_decode(engines["base"], p, a.latency_tokens, "mem", alpha, False),
        "engine:memdec-router": lambda p: engine_decode(engines["base"], p, a.latency_tokens, "mem", alpha,
                                                        True),
        "engine:lora": lambda p: engine_decode(engines["lora"], p, a.latency_tokens, None, 0.0, False),
        "engine:dapt": lambda p: engine_decode(engines["dapt"], p, a.latency_tokens, None, 0.0, False),
        "hf:base": lambda p: hf_decode(base.model, p, a.latency_tokens, vocab),
        "hf:knn-lm": lambda p: hf_decode(base.model, p, a.latency_tokens, vocab, knn=knn_cfg),
        "hf:rag": lambda p: hf_decode(base.model, p, a.latency_tokens, vocab, rag=retriever),
    }
    result: dict[str, Any] = {"tokens": a.latency_tokens, "repeats": a.repeats, "seconds_per_token": {}}
    for batch in (1, 8):
        names = [n for n in runs if not (batch > 1 and n == "hf:rag")]  # RAG's re-encode is batch 1 only
        p = prompts[:batch]
        for n in names:  # warm-up
            runs[n](p)
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(a.repeats):
            for n in names:
                times[n].append(runs[n](p))
        per_tok = {n: statistics.median(v) / (batch * (a.latency_tokens - 1)) for n, v in times.items()}
        result["seconds_per_token"][f"b{batch}"] = per_tok
        log(f"    b{batch}: " + "  ".join(f"{n} {v * 1e3:.1f} ms" for n, v in per_tok.items()))

    def ratios(b: str) -> dict[str, float]:
        s = result["seconds_per_token"][b]
        r = {m: s[f"engine:{m}"] / s["engine:base"] for m in ("memdec", "memdec-router", "lora", "dapt")}
        r["base"] = 1.0
        r["knn-lm"] = s["hf:knn-lm"] / s["hf:base"]
        if "hf:rag" in s:
            r["rag"] = s["hf:rag"] / s["hf:base"]
        return r

    result["ratio"], result["ratio_b8"] = ratios("b1"), ratios("b8")
    return result


# ---------------------------------------------------------------- main


def table(domains: dict[str, Any]) -> str:
    rows = ["| domain | method | held-out ppl | general ppl | latency b1 | latency b8 | train CPU-s |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for d, r in domains.items():
        for m in METHODS:
            x = r["methods"][m]

            def f(v: Any, fmt: str) -> str:
                return "—" if v is None else format(v, fmt)

            rows.append(f"| {d} ({r['heldout_source']}) | {m} | {f(x.get('heldout_ppl'), '.2f')} | "
                        f"{f(x.get('general_ppl'), '.2f')} | {f(x.get('latency_ratio'), '.2f')}× | "
                        f"{f(x.get('latency_ratio_b8'), '.2f')}{'×' if x.get('latency_ratio_b8') else ''} | "
                        f"{f(x.get('train_cpu_s'), '.1f' if (x.get('train_cpu_s') or 0) < 10 else '.0f')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", default="legal,biomedical")
    p.add_argument("--recipe", type=Path, default=RECIPE, help="the demo recipe's work dir (its loso/ folds)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--work", type=Path, default=WORK, help="cache of every expensive piece (resumable)")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--tune-tokens", type=int, default=2048)
    p.add_argument("--train-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--dapt-lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--passage-tokens", type=int, default=128)
    p.add_argument("--rag-every", type=int, default=256)
    p.add_argument("--rag-paper-tokens", type=int, default=64)
    p.add_argument("--latency-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--base", default=None, help="the base (default: the demo's GGUF)")
    p.add_argument("--out", type=Path, default=None, help="results dir (default bench/results)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import faiss

    faiss.omp_set_num_threads(a.threads)
    base_path = a.base
    if base_path is None:
        from bench.common import demo_base_path

        base_path = demo_base_path()
        if base_path is None:
            raise SystemExit(2)
    domains = {}
    for d in a.domains.split(","):
        domains[d] = run_domain(d, a, base_path)
        # Written after every domain, so a late domain never costs the finished ones.
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        settings.update(base=base_path, context=CONTEXT, stride=STRIDE, query_tokens=QUERY_TOKENS,
                        paper_rag_every=PAPER_RAG_EVERY,
                        knn_grid={"k": KNN_KS, "tau": KNN_TAUS, "lambda": KNN_LAMBDAS},
                        lora_targets=LORA_TARGETS)
        path = write_result("paper_comparison", {"settings": settings, "domains": domains}, a.out)
        log(f"wrote {path}")
    print(table(domains))


if __name__ == "__main__":
    main()
