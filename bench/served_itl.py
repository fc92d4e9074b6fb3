"""Served inter-token latency at batch 1 against a bare two-model transformers loop, side by side in one run.

    python -m bench.served_itl [--tokens 64] [--requests 8] [--memory biomed] [--alpha 0.6] [--before DIR]

memdec serve runs the demo's base (SmolLM2-135M-Instruct from its GGUF, float32: `--quantization none`, the
bare loop's precision) with one demo memory. One client streams completions one at a time (batch 1: the
memory at α, `"speculative": false`, greedy, EOS ignored; prompts are 32-token openings of the memory's
domain's valid.txt, sent as token ids) and times the chunks as they arrive: a request's ITL is
(last token's arrival − first token's) / (tokens − 1) (a token whose text is held back for the next arrives
with it; the count of chunks is printed). The bare loop is the floor: the same two models
through plain transformers in this process, each with a `DynamicCache`, p = α·p_mem + (1 − α)·p_base in logs,
argmax, the token read to the host, one token at a time; its ITL is its decode time / (tokens − 1). Medians
over requests; served / bare is the engine's cost at batch 1 (issue 27's target ≤ 1.15×, goal ≤ 1.05×).

`--before DIR` serves a second checkout too (another commit's `server/`, on this virtualenv), so a change is
measured before and after in the same run. Setups alternate request by request, so load on the machine hits
them alike; each server is idle while another setup runs. Every process runs on one thread
(`OMP_NUM_THREADS=1`). Writes bench/results/served_itl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from bench.common import DEMO, cache_kwarg, demo_base_path, write_result
from bench.speculative import domain_prompts
from server.config import ModelConfig
from server.loader import load_base
from testkit.server import serve


def served_itl(url: str, prompt: tuple[int, ...], tokens: int, memory: str, alpha: float) -> dict:
    """One streamed completion: its ITL (seconds), its text and how many chunks carried it."""
    body = {
        "model": "base", "prompt": list(prompt), "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True,
        "memory": memory, "alpha": alpha, "speculative": False, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip  # the request's fields grouped by kind
    arrivals, text, usage = [], [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    arrivals.append(time.perf_counter())
                    text.append(choice["text"])
    assert usage is not None and usage["completion_tokens"] == tokens, usage
    itl = (arrivals[-1] - arrivals[0]) / (tokens - 1)
    return {"itl": itl, "text": "".join(text), "chunks": len(arrivals)}


class BareLoop:
    """The two models through plain transformers, one `DynamicCache` each: what a token costs with no
    engine."""

    def __init__(self, base, memory, alpha: float) -> None:
        self.models = (base, memory)
        self.kws = tuple(cache_kwarg(m) for m in self.models)
        self.log_weights = (torch.tensor(alpha).log(), torch.tensor(1.0 - alpha).log())

    def _next(self, ids: torch.Tensor, caches: tuple[DynamicCache, DynamicCache]) -> torch.Tensor:
        """Both models on `ids` ([1, n]), each extending its cache; the argmax of their mixture, [1, 1]."""
        base_logits, mem_logits = (m(input_ids=ids, use_cache=True, **{kw: c}).logits[:, -1]  # [1, V]
                                   for m, kw, c in zip(self.models, self.kws, caches, strict=True))
        mixed = torch.logaddexp(self.log_weights[0] + mem_logits.log_softmax(-1),
                                self.log_weights[1] + base_logits.log_softmax(-1))
        return mixed.argmax(-1, keepdim=True)

    @torch.inference_mode()
    def run(self, prompt: tuple[int, ...], tokens: int) -> dict:
        caches = (DynamicCache(), DynamicCache())
        token = self._next(torch.tensor([prompt]), caches)  # the prefill: not timed
        drawn = [int(token.item())]
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            token = self._next(token, caches)
            drawn.append(int(token.item()))  # the host needs each token, as a stream does
        return {"itl": (time.perf_counter() - t0) / (tokens - 1), "tokens": drawn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--memory", default="biomed")
    parser.add_argument("--alpha", type=float, default=0.6)
    parser.add_argument("--before", type=Path, help="a second checkout to serve as `before`")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base_path = demo_base_path()
    if base_path is None:
        raise SystemExit("the demo base is not installed (make install)")
    memory_dir = DEMO / "memories" / args.memory
    base = load_base(ModelConfig(base_path, quantization="none"))
    memory = AutoModelForCausalLM.from_pretrained(memory_dir, dtype=torch.float32).eval()
    domain = json.loads((memory_dir / "memdec.json").read_text())["domain"]
    prompts = domain_prompts(base.tokenizer, domain, args.requests)
    bare = BareLoop(base.model, memory, args.alpha)
    serve_args = ["--model", base_path, "--served-model-name", "base", "--quantization", "none",
                  "--memory", f"{args.memory}={memory_dir}"]
    checkouts = {"after": None} if args.before is None else {"before": args.before.resolve(), "after": None}
    results: dict[str, list[dict]] = {name: [] for name in ("bare", *checkouts)}
    logs = Path(tempfile.mkdtemp(prefix="memdec-served-itl-"))
    with ExitStack() as stack:
        urls = {}
        for name, checkout in checkouts.items():
            env = {"OMP_NUM_THREADS": "1"}
            if checkout is not None:
                env["PYTHONPATH"] = f"{checkout}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
            server = stack.enter_context(serve(serve_args, logs / f"{name}.log", env=env))
            urls[name] = server.url
            served_itl(server.url, prompts[0], 8, args.memory, args.alpha)  # warm-up
        bare.run(prompts[0], 8)
        print(f"{len(prompts)} requests of {args.tokens} tokens, {args.memory} at α {args.alpha}, batch 1",
              flush=True)
        for i, prompt in enumerate(prompts):  # setups round-robin, request by request
            results["bare"].append(bare.run(prompt, args.tokens))
            for name, url in urls.items():
                results[name].append(served_itl(url, prompt, args.tokens, args.memory, args.alpha))
            print(f"  request {i + 1}: " + "  ".join(f"{name} {r[-1]['itl'] * 1e3:6.2f} ms"
                                                    for name, r in results.items()), flush=True)
    itl = {name: statistics.median(r["itl"] for r in rows) * 1e3 for name, rows in results.items()}
    same = {name: sum(r["text"] == base.tokenizer.decode(b["tokens"], skip_special_tokens=True)
                      for r, b in zip(rows, results["bare"], strict=True))
            for name, rows in results.items() if name != "bare"}  # fmt: skip  # one comprehension
    chunks = {name: statistics.median(r["chunks"] for r in rows) for name, rows in results.items()
              if name != "bare"}
    print(f"\nITL at batch 1 (median of {len(prompts)} requests): "
          f"bare transformers loop {itl['bare']:.2f} ms")
    for name in checkouts:
        print(f"  served ({name}): {itl[name]:.2f} ms = {itl[name] / itl['bare']:.3f}× bare; "
              f"same text as the bare loop in {same[name]}/{len(prompts)}; "
              f"{chunks[name]:.0f} chunks a request")
    if "before" in checkouts:
        print(f"  after / before: {itl['after'] / itl['before']:.3f}")
    path = write_result("served_itl", {
        "base": base_path, "memory": args.memory, "alpha": args.alpha, "tokens": args.tokens,
        "requests": len(prompts), "before": str(args.before) if args.before else None, "itl_ms": itl,
        "served_over_bare": {name: itl[name] / itl["bare"] for name in checkouts}, "same_text": same,
        "per_request_itl_ms": {name: [r["itl"] * 1e3 for r in rows] for name, rows in results.items()},
    })  # fmt: skip  # the result's fields grouped by kind
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
