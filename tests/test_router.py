"""The learned per-token router (`"alpha": "auto"`): α_t = σ(MLP(features of both distributions)).

Every served number is checked against an independent reference: full no-cache forwards of each model, the
router's features and MLP re-computed here by hand in float64 from its saved tensors, and the mixture formula
in probability space. Plus: the toolkit's evaluation NLL equals `/v1/perplexity`'s on the same windows; a
missing or corrupt router is a load error; the CLI fits, saves and refuses in-source text; the API's errors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from memories.cli import main as toolkit
from memories.config import EvalConfig
from memories.manifest import read_manifest, write_manifest
from memories.router import (
    FEATURES,
    ROUTER_CONFIG,
    ROUTER_WEIGHTS,
    Router,
    RouterConfig,
    RouterError,
    load_router,
    save_router,
)
from memories.router_fit import evaluate_router, score_text
from server.config import EngineConfig, MemorySpec, ModelConfig, ServerConfig
from server.engine import Engine
from server.errors import InvalidRequestError, MemoryLoadError
from server.loader import load_base
from server.registry import MemoryRegistry
from server.request import GenerationRequest, PerplexityRequest, SamplingParams
from tests.api_harness import InProcessServer
from tests.engine_helpers import assert_clean, host_reads, logprobs_of, prompt, run

TEXT = "The patient was given a dose of the statute on inflation, and the court held that the dose was"


def _random_router(hidden: int, seed: int) -> Router:
    """A router whose α_t really varies with the features (default init on roughly standardised inputs)."""
    torch.manual_seed(seed)
    router = Router(RouterConfig(hidden=hidden))
    with torch.no_grad():
        router.mean.copy_(torch.tensor([5.0, 5.0, -3.0, -3.0, 0.5, -6.0, -6.0, 1.0]))
        router.std.fill_(1.5)
    return router


def _with_router(src: Path, dst: Path, router: Router | None) -> Path:
    shutil.copytree(src, dst)
    if router is not None:
        entry = save_router(router, dst)
        write_manifest(dst, read_manifest(dst).replace(router=entry))
    return dst


@pytest.fixture(scope="module")
def routed(zoo, tmp_path_factory):
    """The zoo's base with "rmed" (Llama, MLP router), "rlaw" (Qwen2, padded vocabulary, logistic router) and
    "med" (no router)."""
    root = tmp_path_factory.mktemp("routed")
    base = load_base(ModelConfig(str(zoo.base)))
    registry = MemoryRegistry(base)
    registry.load("rmed", str(_with_router(zoo.mem_llama, root / "rmed", _random_router(4, 0))))
    registry.load("rlaw", str(_with_router(zoo.mem_qwen_padded, root / "rlaw", _random_router(0, 1))))
    registry.load("med", str(zoo.mem_llama))
    return base, registry, root


# ---------------------------------------------------------------- the independent reference


def _hand_alpha(directory: Path, base_logits: torch.Tensor, mem_logits: torch.Tensor) -> torch.Tensor:
    """α [T] from the router's saved tensors, every feature and layer written out again here (float64)."""
    t = load_file(str(Path(directory) / ROUTER_WEIGHTS))
    b = torch.log_softmax(base_logits.double(), -1)
    m = torch.log_softmax(mem_logits.double(), -1)
    pb, pm = b.exp(), m.exp()
    bt, mt = b.argmax(-1), m.argmax(-1)
    x = torch.stack([
        -(pb * b).sum(-1), -(pm * m).sum(-1), b.max(-1).values, m.max(-1).values, (bt == mt).double(),
        m.gather(-1, bt[:, None])[:, 0], b.gather(-1, mt[:, None])[:, 0], (pm * (m - b)).sum(-1),
    ], -1)  # fmt: skip
    x = (x - t["mean"].double()) / t["std"].double()
    if "net.0.weight" in t:  # Linear, tanh, Linear
        h = torch.tanh(x @ t["net.0.weight"].double().T + t["net.0.bias"].double())
        z = h @ t["net.2.weight"].double().T + t["net.2.bias"].double()
    else:
        z = x @ t["net.weight"].double().T + t["net.bias"].double()
    return torch.sigmoid(z[:, 0])


@torch.no_grad()
def _reference(base, registry, root, name: str, ids: list[int]) -> torch.Tensor:
    """log p_t [T, V] at every position of `ids`: α_t·p_mem + (1 − α_t)·p_base from one full forward each."""
    vocab = base.vocab_size
    t = torch.tensor([ids])
    bl = base.model(t).logits[0, :, :vocab].double()
    ml = registry.loaded(name).model(t).logits[0, :, :vocab].double()
    a = _hand_alpha(root / name, bl, ml)[:, None]
    return torch.log(a * torch.softmax(ml, -1) + (1 - a) * torch.softmax(bl, -1))


def _routed(base, rid: str, text: str, name: str, n: int, **kw) -> GenerationRequest:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=base.vocab_size, **kw)
    return GenerationRequest(rid, prompt(base, text), params, name, routed=True)


# ---------------------------------------------------------------- files


def test_router_round_trips_and_bad_files_are_clear_errors(tmp_path):
    router = _random_router(4, 0)
    entry = save_router(router, tmp_path)
    again = load_router(tmp_path, entry)
    x = torch.randn(7, len(FEATURES))
    assert torch.equal(router.logit(x), again.logit(x))
    cfg = json.loads((tmp_path / ROUTER_CONFIG).read_text())

    def broken(change) -> str:
        d = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tmp_path, d, ignore=shutil.ignore_patterns("b*"))
        change(d)
        with pytest.raises(RouterError) as exc:
            load_router(d)
        return str(exc.value)

    assert "missing" in broken(lambda d: (d / ROUTER_WEIGHTS).unlink())
    assert "does not hold" in broken(lambda d: (d / ROUTER_WEIGHTS).write_bytes(b"\x00garbage" * 10))
    assert "not a router config" in broken(lambda d: (d / ROUTER_CONFIG).write_text("{"))
    assert "features" in broken(lambda d: (d / ROUTER_CONFIG).write_text(json.dumps({**cfg, "features": ["x"]})))
    assert "version" in broken(lambda d: (d / ROUTER_CONFIG).write_text(json.dumps({**cfg, "version": 99})))
    assert "does not hold" in broken(lambda d: (d / ROUTER_CONFIG).write_text(json.dumps({**cfg, "hidden": 5})))


def test_registry_refuses_a_memory_whose_router_is_missing_or_corrupt(routed, zoo, tmp_path):
    base, registry, root = routed
    before = [m.name for m in registry.list()]
    for i, damage in enumerate([lambda d: (d / ROUTER_WEIGHTS).unlink(),
                                lambda d: (d / ROUTER_WEIGHTS).write_bytes(b"not safetensors")]):  # fmt: skip
        d = tmp_path / f"m{i}"
        shutil.copytree(root / "rmed", d)
        damage(d)
        with pytest.raises(MemoryLoadError) as exc:
            registry.load(f"bad{i}", str(d))
        assert exc.value.code == "router_load_failed" and f"bad{i}" in exc.value.message
    assert [m.name for m in registry.list()] == before
    assert registry.get("rmed").router and not registry.get("med").router
    # An older manifest (no `router` key at all) still loads, without a router.
    old = tmp_path / "old"
    shutil.copytree(zoo.mem_llama, old)
    data = json.loads((old / "memdec.json").read_text())
    data.pop("router")
    (old / "memdec.json").write_text(json.dumps(data))
    assert not registry.load("old", str(old)).router
    registry.unload("old")


# ---------------------------------------------------------------- engine


@pytest.mark.parametrize("config", [
    EngineConfig(block_size=4),
    EngineConfig(block_size=4, max_num_batched_tokens=8, enable_chunked_prefill=True),
    EngineConfig(block_size=4, speculative_tokens=3),
], ids=["plain", "chunked", "speculative"])  # fmt: skip
def test_every_routed_step_equals_the_reference_in_a_mixed_batch(routed, config):
    """Routed rows of two memories beside a fixed-α row of a routed memory's group, and a row of the base alone."""
    base, registry, root = routed
    reqs = [
        _routed(base, "a", "The patient was given", "rmed", 8),
        _routed(base, "b", "The court held that", "rlaw", 9),
        GenerationRequest("c", prompt(base, "The dose of"), SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True,
                          logprobs=base.vocab_size), "rmed", 0.6),  # fmt: skip
        GenerationRequest("d", prompt(base, "Once upon"), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)),
    ]
    engine = Engine(base, registry, config)
    out = run(engine, reqs[:2], join={2: reqs[2:]})
    for r in reqs[:2]:
        ctx = list(r.prompt_token_ids)
        lps = logprobs_of(out[r.request_id])
        assert len(lps) == r.params.max_tokens
        for lp in lps:
            ref = _reference(base, registry, root, r.memory, ctx)[-1]
            got = torch.full_like(ref, float("-inf"))
            ids, vals = zip(*lp.top, strict=True)
            got[list(ids)] = torch.tensor(vals, dtype=torch.float64)
            assert (got - ref).abs().max().item() <= 1e-4, r.request_id
            assert lp.token_id == int(ref.argmax())
            ctx.append(lp.token_id)
    fixed = logprobs_of(out["c"])  # the fixed-α row in the routed group: plain α·p_mem + (1 − α)·p_base
    ctx = list(reqs[2].prompt_token_ids)
    with torch.no_grad():
        for lp in fixed:
            t = torch.tensor([ctx])
            p = 0.6 * torch.softmax(registry.loaded("rmed").model(t).logits[0, -1, : base.vocab_size].double(), -1)
            p += 0.4 * torch.softmax(base.model(t).logits[0, -1, : base.vocab_size].double(), -1)
            assert abs(lp.logprob - math.log(p[lp.token_id])) <= 1e-4
            ctx.append(lp.token_id)
    assert_clean(engine)
    assert registry.users("rmed") == registry.users("rlaw") == 0


def test_routed_rows_do_not_draft_and_echo_follows_the_router(routed):
    base, registry, root = routed
    engine = Engine(base, registry, EngineConfig(block_size=4, speculative_tokens=3))
    r = GenerationRequest("e", prompt(base, TEXT), SamplingParams(max_tokens=0, prompt_logprobs=3), "rmed", routed=True)
    seq = engine.add_request(r)
    assert not seq.speculative and seq.base_weight == 1.0
    engine.abort_request("e")
    out = run(engine, [r])
    plps = out["e"][0].prompt_logprobs
    ids = list(r.prompt_token_ids)
    ref = _reference(base, registry, root, "rmed", ids)
    for t in range(1, len(ids)):
        assert abs(plps[t].logprob - ref[t - 1, ids[t]].item()) <= 1e-4
        assert [i for i, _ in plps[t].top] == ref[t - 1].topk(3).indices.tolist()


def test_engine_refuses_auto_alpha_without_a_router(routed):
    base, registry, _ = routed
    engine = Engine(base, registry, EngineConfig(block_size=4))
    with pytest.raises(InvalidRequestError) as exc:
        engine.add_request(GenerationRequest("x", prompt(base, "The"), SamplingParams(max_tokens=2), "med", routed=True))
    assert exc.value.code == "memory_has_no_router" and registry.users("med") == 0
    with pytest.raises(InvalidRequestError):
        engine.add_perplexity(PerplexityRequest("p", (prompt(base, TEXT),), memory="med", routed=True))
    assert registry.users("med") == 0
    assert_clean(engine)


def test_one_host_read_per_decode_step_with_a_router(routed, monkeypatch):
    base, registry, _ = routed
    engine = Engine(base, registry, EngineConfig(block_size=2))
    for r in [_routed(base, "a", "The patient was", "rmed", 30),
              GenerationRequest("b", prompt(base, "The court"), SamplingParams(max_tokens=30, temperature=0.8, seed=1,
                                ignore_eos=True), "rmed", 0.4)]:  # fmt: skip
        engine.add_request(r)
    for _ in range(3):
        engine.step()
    assert host_reads(engine, 10, monkeypatch) == ["fetch"] * 10
    for rid in ("a", "b"):
        engine.abort_request(rid)
    assert registry.users("rmed") == 0


# ---------------------------------------------------------------- perplexity: server = toolkit = reference


@torch.no_grad()
def test_perplexity_auto_equals_the_toolkit_evaluation_and_the_reference(routed):
    base, registry, root = routed
    ids = list(prompt(base, " ".join([TEXT] * 3)))
    context, stride = 16, 8
    engine = Engine(base, registry, EngineConfig(block_size=4))
    job = engine.add_perplexity(PerplexityRequest("p", (tuple(ids),), memory="rmed", routed=True, context_length=context,
                                                  stride=stride, token_logprobs=2))  # fmt: skip
    while True:
        result = engine.step()
        if result.jobs:
            break
    (done,) = result.jobs
    assert done.error is None and job.done
    doc = done.result.documents[0]
    server_nll = doc.mixed[0].mean_nll
    # The toolkit's evaluation (what `memdec memory router` reports) on the same windows.
    scored = score_text(base.model, registry.loaded("rmed").model, np.asarray(ids), base.vocab_size, "t",
                        EvalConfig(context=context, stride=stride), progress=False)  # fmt: skip
    toolkit_nll = evaluate_router(load_router(root / "rmed"), scored, (0.5,), 0.5)["router_nll"]
    assert abs(server_nll - toolkit_nll) <= 1e-4
    # The reference: each window's full forward, the router by hand, the formula.
    from memories.perplexity import sliding_windows

    per_token = []
    for w in sliding_windows(len(ids), context, stride):
        ref = _reference(base, registry, root, "rmed", ids[w.begin : w.end])
        for pos in range(w.score_from, w.end):
            per_token.append(ref[pos - w.begin - 1, ids[pos]].item())
    assert abs(server_nll + sum(per_token) / len(per_token)) <= 1e-4
    assert max(abs(a - b) for a, b in zip(doc.tokens.mixed, per_token, strict=True)) <= 1e-4
    # Without per-token answers (the plain request), and through the HTTP-sized defaults: the same NLL.
    engine.add_perplexity(PerplexityRequest("q", (tuple(ids),), memory="rmed", routed=True, context_length=context,
                                            stride=stride))  # fmt: skip
    while not (result := engine.step()).jobs:
        pass
    assert result.jobs[0].error is None
    assert abs(result.jobs[0].result.documents[0].mixed[0].mean_nll - server_nll) <= 1e-6
    assert registry.users("rmed") == 0


# ---------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def routed_server(routed, zoo):
    _, _, root = routed
    config = ServerConfig(model=ModelConfig(str(zoo.base)),
                          memories=(MemorySpec("rmed", str(root / "rmed")), MemorySpec("med", str(zoo.mem_llama))))  # fmt: skip
    with InProcessServer(config) as s:
        yield s


def test_api_auto_alpha(routed_server, routed):
    base, registry, root = routed
    s = routed_server
    cards = {c["id"]: c for c in s.get("/v1/models").json()["data"]}
    assert cards["rmed"]["router"] is True and cards["med"]["router"] is False
    r = s.post("/v1/completions", {"prompt": TEXT, "memory": "rmed", "alpha": "auto", "max_tokens": 0, "echo": True,
                                   "logprobs": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["alpha"] == "auto"
    ids = list(prompt(base, TEXT))
    ref = _reference(base, registry, root, "rmed", ids)
    want = [ref[t - 1, ids[t]].item() for t in range(1, len(ids))]
    got = r.json()["choices"][0]["logprobs"]["token_logprobs"][1:]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4
    p = s.post("/v1/perplexity", {"input": TEXT, "memory": "rmed", "alpha": "auto", "logprobs": 0})
    assert p.status_code == 200, p.text
    assert p.json()["alpha"] == "auto" and abs(p.json()["overall"]["nll"] + sum(want) / len(want)) <= 1e-4
    g = s.post("/v1/completions", {"prompt": "The patient", "model": "rmed", "alpha": "auto", "max_tokens": 3})
    assert g.status_code == 200, g.text
    for body, code in [
        ({"prompt": "x", "memory": "med", "alpha": "auto"}, "memory_has_no_router"),
        ({"prompt": "x", "memory": ["rmed", "med"], "alpha": "auto"}, None),
        ({"prompt": "x", "alpha": "auto"}, None),
        ({"prompt": "x", "memory": "auto", "alpha": "auto"}, None),
        ({"prompt": "x", "memory": "rmed", "alpha": "automatic"}, None),
    ]:
        e = s.post("/v1/completions", body)
        assert e.status_code == 400, (body, e.text)
        assert e.json()["error"]["param"] == "alpha" or code is None, e.text
        if code:
            assert e.json()["error"]["code"] == code
    e = s.post("/v1/perplexity", {"input": TEXT, "memory": "med", "alpha": "auto"})
    assert e.status_code == 400 and e.json()["error"]["code"] == "memory_has_no_router"


# ---------------------------------------------------------------- toolkit CLI


def test_cli_fits_saves_and_refuses_in_source_text(zoo, tmp_path, capsys):
    mem = _with_router(zoo.mem_llama, tmp_path / "mem", None)
    manifest = read_manifest(mem)
    text = tmp_path / "held.txt"
    text.write_text("\n".join(f"{TEXT} {i}" for i in range(12)) + "\n")
    write_manifest(mem, manifest.replace(
        corpus={"holdout_sources": ["held"]},
        evaluation={"texts": [{"label": "seen", "kind": "in-source", "file": str(tmp_path / "seen.txt")}]},
    ))  # fmt: skip
    common = ["memory", "router", "--memory", str(mem), "--base", str(zoo.base), "--quiet", "--context", "32"]
    assert toolkit([*common, "--text", f"seen={text}"]) == 2
    assert "comes from a source of this memory's datastore" in capsys.readouterr().err
    assert not (mem / ROUTER_WEIGHTS).exists()
    assert toolkit([*common, "--text", str(text), "--eval-text", f"other={text}", "--alphas", "0.2,0.5,0.8"]) == 0
    out = capsys.readouterr().out
    assert "router for" in out and "other" in out
    m = read_manifest(mem)
    assert m.router["weights"] == ROUTER_WEIGHTS and m.router["evaluation"][0]["label"] == "other"
    router = load_router(mem, m.router)
    report = json.loads((mem / "router-evaluation.json").read_text())
    assert report["fitted"]["texts"][0]["label"] == "held" and (mem / "router-evaluation.png").is_file()
    t = report["texts"][0]
    assert t["router_ppl"] > 0 and len(t["mixture"]) == 3
    # --from copies a router into another memory without fitting.
    other = _with_router(zoo.mem_llama, tmp_path / "other", None)
    assert toolkit(["memory", "router", "--memory", str(other), "--base", str(zoo.base), "--from", str(mem), "--quiet",
                    "--context", "32", "--eval-text", f"x={text}"]) == 0  # fmt: skip
    copied = load_router(other, read_manifest(other).router)
    x = torch.randn(5, len(FEATURES))
    assert torch.equal(router.logit(x), copied.logit(x))
