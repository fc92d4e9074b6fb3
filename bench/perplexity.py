"""/v1/perplexity throughput vs the reference two-pass loop, and agreement to 1e-4.

    python -m bench.perplexity [--models tiny,demo] [--tokens 20000] [--context 512]

The reference is what the paper's evaluation scripts do: for every window run the base and the
memory over it, take full log-softmaxes [T, V], mix them over the whole vocabulary with logaddexp,
gather the targets. memdec computes each model's target log-probs once per window (logits only at
scored positions) and mixes gathered values, so an α grid costs one pass; the reference is timed
once per α.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.common import model_sets, write_result
from memories.models import load_causal_lm, load_tokenizer
from memories.perplexity import sliding_windows
from testkit.server import serve
from testkit.text import sample_text


@torch.inference_mode()
def reference(base, mem, ids: list[int], context: int, stride: int, alpha: float,
              vocab: int) -> tuple[float, int]:
    nll, count = 0.0, 0
    t = torch.tensor(ids)
    for w in sliding_windows(len(ids), context, stride):
        window = t[w.begin : w.end].unsqueeze(0)  # [1, T]
        base_lp = torch.log_softmax(base(window).logits[0, :, :vocab].float(), -1)  # [T, V]
        mem_lp = torch.log_softmax(mem(window).logits[0, :, :vocab].float(), -1)  # [T, V]
        mixed = torch.logaddexp(math.log(alpha) + mem_lp, math.log1p(-alpha) + base_lp)  # [T, V]
        first = w.score_from - w.begin - 1
        targets = t[w.score_from : w.end]
        nll -= mixed[first : first + w.num_scored].gather(-1, targets.unsqueeze(-1)).sum().item()
        count += w.num_scored
    return nll, count


def bench(label: str, base_dir: str, mem_dir: str, tokens: int, context: int, alphas: list[float],
          repeats: int) -> dict:
    tok = load_tokenizer(base_dir)  # a directory's, or the one inside the demo base's GGUF file
    text = sample_text("biomedical", tokens * 8)
    ids = tok(text).input_ids[:tokens]
    # float32 as memdec uses on a CPU (the demo's GGUF base is dequantized to it, as memdec loads it).
    base = load_causal_lm(base_dir, "cpu", torch.float32)
    mem = load_causal_lm(mem_dir, "cpu", torch.float32)
    context = min(context, base.config.max_position_embeddings
                  if hasattr(base.config, "max_position_embeddings") else context)
    stride = context // 2
    vocab = len(tok)
    reference(base, mem, ids[: context * 2], context, stride, alphas[0], vocab)  # warm-up
    logs = Path(tempfile.mkdtemp(prefix="memdec-ppl-"))
    times: dict[str, list[float]] = {"reference": [], "one": [], "grid": []}
    with serve(["--model", base_dir, "--memory", f"mem={mem_dir}"], logs / "server.log") as server:
        body = {"memory": "mem", "input": ids, "context_length": context, "stride": stride}
        httpx.post(server.url + "/v1/perplexity",
                   json={**body, "input": ids[: context * 2], "alpha": alphas[0]}, timeout=600)
        for _ in range(repeats):  # round-robin, so load on a shared machine hits both sides alike
            t0 = time.perf_counter()
            ref_nll, count = reference(base, mem, ids, context, stride, alphas[0], vocab)
            times["reference"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            one = httpx.post(server.url + "/v1/perplexity", json={**body, "alpha": alphas[0]},
                             timeout=600).json()
            times["one"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            grid = httpx.post(server.url + "/v1/perplexity", json={**body, "alpha": alphas},
                              timeout=600).json()
            times["grid"].append(time.perf_counter() - t0)
    t_ref, t_one, t_grid = (statistics.median(times[k]) for k in ("reference", "one", "grid"))
    got = one["data"][0]
    memdec_nll = got["nll"] * got["num_tokens"]
    row = {
        "models": label,
        "tokens": count,
        "context": context,
        "stride": stride,
        "reference_tok_s": count / t_ref,
        "memdec_tok_s": count / t_one,
        "speedup": t_ref / t_one,
        "alpha_grid": alphas,
        "speedup_alpha_grid": t_ref * len(alphas) / t_grid,
        "reference_nll": ref_nll,
        "memdec_nll": memdec_nll,
        "relative_difference": abs(memdec_nll - ref_nll) / abs(ref_nll),
        "grid_first_alpha_nll": grid["data"][0]["alphas"][0]["nll"] * grid["data"][0]["num_tokens"],
    }
    print(
        f"{label:>5}: {count} tokens, context {context}, stride {stride}: "
        f"reference {row['reference_tok_s']:8.1f} tok/s, "
        f"memdec {row['memdec_tok_s']:8.1f} tok/s ({row['speedup']:.2f}x; "
        f"α grid of {len(alphas)}: {row['speedup_alpha_grid']:.2f}x); "
        f"relative NLL difference {row['relative_difference']:.2e}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,demo")
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--alphas", default="0.2,0.4,0.6,0.8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    rows = []
    for label, base, memory in model_sets(args.models):
        rows.append(bench(label, base, memory, args.tokens, args.context, alphas, args.repeats))
    print(f"wrote {write_result('perplexity', {'rows': rows})}")


if __name__ == "__main__":
    main()
