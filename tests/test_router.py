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
from memories.mixing import Mixture
from memories.router import (
    DEFAULT_CONTEXT_DECAYS,
    FEATURES,
    ROUTER_CONFIG,
    ROUTER_WEIGHTS,
    Router,
    RouterConfig,
    RouterError,
    advantage_emas,
    load_router,
    save_router,
)
from memories.router_fit import FitConfig, evaluate_router, fit_router, score_text
from server.config import EngineConfig, MemorySpec, ModelConfig, ServerConfig
from server.engine import Engine
from server.errors import InvalidRequestError, MemoryLoadError
from server.loader import load_base
from server.registry import MemoryRegistry
from server.request import GenerationRequest, PerplexityRequest, SamplingParams
from tests.api_harness import InProcessServer
from tests.engine_helpers import assert_clean, dense_logp, host_reads, logprobs_of, prompt, run

TEXT = "The patient was given a dose of the statute on inflation, and the court held that the dose was"


# Fast decays, so that a few tokens move the context features (the toolkit's default is 0.9, 0.99).
DECAYS = (0.5, 0.9)


def _random_router(hidden: int, seed: int, decays: tuple[float, ...] = ()) -> Router:
    """A router whose α_t really varies with the features (default init on roughly standardised inputs)."""
    torch.manual_seed(seed)
    router = Router(RouterConfig.with_context(decays, hidden=hidden))
    with torch.no_grad():
        router.mean.copy_(torch.tensor([5.0, 5.0, -3.0, -3.0, 0.5, -6.0, -6.0, 1.0] + [0.0] * len(decays)))
        router.std.fill_(1.5)
        router.std[len(FEATURES):] = 0.3  # the advantage EMAs: a few tenths of a nat move α
    return router


def _with_router(src: Path, dst: Path, router: Router | None) -> Path:
    shutil.copytree(src, dst)
    if router is not None:
        entry = save_router(router, dst)
        # written as routers were before context features: no `context_decays` key
        if not router.context_decays:
            entry.pop("context_decays")
            config = json.loads((dst / ROUTER_CONFIG).read_text())
            config.pop("context_decays")
            (dst / ROUTER_CONFIG).write_text(json.dumps(config))
        write_manifest(dst, read_manifest(dst).replace(router=entry))
    return dst


@pytest.fixture(scope="module")
def routed(zoo, tmp_path_factory):
    """The zoo's base with "rmed" (Llama, MLP router), "rlaw" (Qwen2, padded vocabulary, logistic router) —
    both router files as they were written before context features — and "med" (no router)."""
    root = tmp_path_factory.mktemp("routed")
    base = load_base(ModelConfig(str(zoo.base)))
    registry = MemoryRegistry(base)
    registry.load("rmed", str(_with_router(zoo.mem_llama, root / "rmed", _random_router(4, 0))))
    registry.load("rlaw", str(_with_router(zoo.mem_qwen_padded, root / "rlaw", _random_router(0, 1))))
    registry.load("med", str(zoo.mem_llama))
    # Routers with context features (the advantage EMAs): an MLP on Llama, a logistic one on padded Qwen2.
    registry.load("cmed", str(_with_router(zoo.mem_llama, root / "cmed", _random_router(4, 2, DECAYS))))
    registry.load("claw", str(_with_router(zoo.mem_qwen_padded, root / "claw", _random_router(0, 3, DECAYS))))
    return base, registry, root


# ---------------------------------------------------------------- the independent reference


def _hand_emas(d: list[float], decays: tuple[float, ...]) -> torch.Tensor:
    """[len(d) + 1, K]: each decay's moving average of d over the positions before (a loop, float64)."""
    out = torch.zeros(len(d) + 1, len(decays), dtype=torch.float64)
    for k, decay in enumerate(decays):
        acc = 0.0
        for i, v in enumerate(d):
            acc = decay * acc + (1 - decay) * v
            out[i + 1, k] = acc
    return out


def _hand_alpha(directory: Path, base_logits: torch.Tensor, mem_logits: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
    """α [T] from the router's saved tensors, every feature and layer written out again here (float64);
    `context` [T, K]: the advantage EMAs before each position, for a router that reads them."""
    t = load_file(str(Path(directory) / ROUTER_WEIGHTS))
    b = torch.log_softmax(base_logits.double(), -1)
    m = torch.log_softmax(mem_logits.double(), -1)
    pb, pm = b.exp(), m.exp()
    bt, mt = b.argmax(-1), m.argmax(-1)
    x = torch.stack([
        -(pb * b).sum(-1), -(pm * m).sum(-1), b.max(-1).values, m.max(-1).values, (bt == mt).double(),
        m.gather(-1, bt[:, None])[:, 0], b.gather(-1, mt[:, None])[:, 0], (pm * (m - b)).sum(-1),
    ], -1)
    if context is not None:
        x = torch.cat([x, context], -1)
    x = (x - t["mean"].double()) / t["std"].double()
    if "net.0.weight" in t:  # Linear, tanh, Linear
        h = torch.tanh(x @ t["net.0.weight"].double().T + t["net.0.bias"].double())
        z = h @ t["net.2.weight"].double().T + t["net.2.bias"].double()
    else:
        z = x @ t["net.weight"].double().T + t["net.bias"].double()
    return torch.sigmoid(z[:, 0])


@torch.no_grad()
def _reference(base, registry, root, name: str, ids: list[int]) -> torch.Tensor:
    """log p_t [T, V] at every position of `ids`: α_t·p_mem + (1 − α_t)·p_base from one full forward each
    (and, for a router with context features, the advantage log p_mem(y_s) − log p_base(y_s) of every s < t
    averaged)."""
    vocab = base.vocab_size
    t = torch.tensor([ids])
    bl = base.model(t).logits[0, :, :vocab].double()
    ml = registry.loaded(name).model(t).logits[0, :, :vocab].double()
    decays = tuple(json.loads((root / name / ROUTER_CONFIG).read_text()).get("context_decays", ()))
    context = None
    if decays:
        b, m = torch.log_softmax(bl, -1), torch.log_softmax(ml, -1)
        context = _hand_emas([(m[s, ids[s + 1]] - b[s, ids[s + 1]]).item() for s in range(len(ids) - 1)],
                             decays)
    a = _hand_alpha(root / name, bl, ml, context)[:, None]
    return torch.log(a * torch.softmax(ml, -1) + (1 - a) * torch.softmax(bl, -1))


def _routed(base, rid: str, text: str, name: str, n: int, **kw) -> GenerationRequest:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=base.vocab_size, **kw)
    return GenerationRequest(rid, prompt(base, text), params, Mixture.auto(name))


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
    assert "features" in broken(
        lambda d: (d / ROUTER_CONFIG).write_text(json.dumps({**cfg, "features": ["x"]}))
    )
    assert "version" in broken(lambda d: (d / ROUTER_CONFIG).write_text(json.dumps({**cfg, "version": 99})))
    assert "does not hold" in broken(
        lambda d: (d / ROUTER_CONFIG).write_text(json.dumps({**cfg, "hidden": 5}))
    )


def test_advantage_emas_is_one_recurrence_however_the_text_is_cut():
    torch.manual_seed(0)
    d = torch.randn(3, 700, dtype=torch.float64)  # longer than a scan chunk
    want = torch.stack([_hand_emas(row.tolist(), (0.9, 0.99)) for row in d])  # [3, 701, 2]
    before, after = advantage_emas(d, (0.9, 0.99))
    assert (before.double() - want[:, :-1]).abs().max() <= 1e-6 and (after - want[:, -1]).abs().max() <= 1e-12
    state = None
    for a, b in [(0, 1), (1, 130), (130, 131), (131, 700)]:  # a token, a chunk, a token, the rest
        part, state = advantage_emas(d[:, a:b], (0.9, 0.99), state)
        assert (part.double() - want[:, a:b]).abs().max() <= 1e-6
    assert (state - after).abs().max() <= 1e-12


def test_context_router_files_and_older_files(tmp_path):
    """A context router saves its decays; an older router.json (no `context_decays`) loads as the 8-feature
    router it was and computes what it did; features that do not match the decays are refused."""
    router = _random_router(4, 2, DECAYS)
    (tmp_path / "c").mkdir()
    entry = save_router(router, tmp_path / "c")
    assert entry["context_decays"] == list(DECAYS)
    again = load_router(tmp_path / "c", entry)
    assert (again.context_decays == DECAYS
            and again.config.features[-2:] == ("advantage_ema_0.5", "advantage_ema_0.9"))
    x = torch.randn(6, len(FEATURES) + 2)
    assert torch.equal(router.logit(x), again.logit(x))
    b, m = torch.log_softmax(torch.randn(6, 11), -1), torch.log_softmax(torch.randn(6, 11), -1)
    with pytest.raises(ValueError):
        again.log_weights(b, m)  # a context router without its context
    old = tmp_path / "old"
    old.mkdir()
    plain = _random_router(4, 0)
    save_router(plain, old)
    cfg = json.loads((old / ROUTER_CONFIG).read_text())
    cfg.pop("context_decays")
    (old / ROUTER_CONFIG).write_text(json.dumps(cfg))
    loaded = load_router(old)
    assert loaded.context_decays == ()
    assert torch.equal(loaded.log_weights(b, m)[0], plain.log_weights(b, m)[0])
    bad = {**json.loads((tmp_path / "c" / ROUTER_CONFIG).read_text()), "context_decays": [0.5]}
    (tmp_path / "c" / ROUTER_CONFIG).write_text(json.dumps(bad))
    with pytest.raises(RouterError, match="features"):
        load_router(tmp_path / "c")


def test_registry_refuses_a_memory_whose_router_is_missing_or_corrupt(routed, zoo, tmp_path):
    base, registry, root = routed
    before = [m.name for m in registry.list()]
    for i, damage in enumerate([lambda d: (d / ROUTER_WEIGHTS).unlink(),
                                lambda d: (d / ROUTER_WEIGHTS).write_bytes(b"not safetensors")]):
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
], ids=["plain", "chunked", "speculative"])  # fmt: skip  # a table: one row per case
def test_every_routed_step_equals_the_reference_in_a_mixed_batch(routed, config):
    """Routed rows of two memories beside a fixed-α row of a routed memory's group, and a row of the base
    alone."""
    base, registry, root = routed
    reqs = [
        _routed(base, "a", "The patient was given", "rmed", 8),
        _routed(base, "b", "The court held that", "rlaw", 9),
        GenerationRequest("c", prompt(base, "The dose of"),
                          SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True,
                                         logprobs=base.vocab_size), Mixture.one("rmed", 0.6)),
        GenerationRequest("d", prompt(base, "Once upon"),
                          SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)),
    ]
    engine = Engine(base, registry, config)
    out = run(engine, reqs[:2], join={2: reqs[2:]})
    for r in reqs[:2]:
        _check_routed(out, r, base, registry, root)
    fixed = logprobs_of(out["c"])  # the fixed-α row in the routed group: plain α·p_mem + (1 − α)·p_base
    ctx = list(reqs[2].prompt_token_ids)
    with torch.no_grad():
        for lp in fixed:
            t = torch.tensor([ctx])
            p = 0.6 * torch.softmax(
                registry.loaded("rmed").model(t).logits[0, -1, : base.vocab_size].double(), -1
            )
            p += 0.4 * torch.softmax(base.model(t).logits[0, -1, : base.vocab_size].double(), -1)
            assert abs(lp.logprob - math.log(p[lp.token_id])) <= 1e-4
            ctx.append(lp.token_id)
    assert_clean(engine)
    assert registry.users("rmed") == registry.users("rlaw") == 0


def _check_routed(out, r: GenerationRequest, base, registry, root) -> None:
    """Every emitted position of a greedy routed request (all log-probs returned) equals the reference."""
    ctx = list(r.prompt_token_ids)
    lps = logprobs_of(out[r.request_id])
    assert len(lps) == r.params.max_tokens
    for lp in lps:
        ref = _reference(base, registry, root, r.mixture.names[0], ctx)[-1]
        got = dense_logp(lp, ref.numel(), ref.dtype)
        assert (got - ref).abs().max().item() <= 1e-4, r.request_id
        assert lp.token_id == int(ref.argmax())
        ctx.append(lp.token_id)


LONG = TEXT + " and the memory of the case"  # long enough for several chunks and cached blocks


@pytest.mark.parametrize("config", [
    EngineConfig(block_size=4),
    EngineConfig(block_size=4, max_num_batched_tokens=8, enable_chunked_prefill=True),
    EngineConfig(block_size=4, speculative_tokens=3),
    EngineConfig(block_size=4, max_num_batched_tokens=8, enable_chunked_prefill=True, speculative_tokens=2),
], ids=["plain", "chunked", "speculative", "chunked-speculative"])  # fmt: skip  # a table: one row per case
def test_context_router_steps_equal_the_reference_in_a_mixed_batch(routed, config):
    """Routers with context features (two memories, one joining mid-run while others decode, so its prompt
    runs in MIXED steps and, chunked, across steps) beside an old router's row, a fixed-α row of a context
    router's group and a row of the base alone: every position equals full forwards + the EMAs and router by
    hand."""
    base, registry, root = routed
    reqs = [
        _routed(base, "a", LONG, "cmed", 8),
        _routed(base, "b", "The court held that", "claw", 9),
        GenerationRequest("c", prompt(base, "The dose of"),
                          SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True,
                                         logprobs=base.vocab_size), Mixture.one("cmed", 0.6)),
        _routed(base, "o", "The patient was given", "rmed", 6),
        GenerationRequest("d", prompt(base, "Once upon"),
                          SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)),
        _routed(base, "j", LONG + " again", "claw", 5),
    ]
    engine = Engine(base, registry, config)
    out = run(engine, reqs[:2], join={2: reqs[2:5], 4: reqs[5:]})
    for r in (reqs[0], reqs[1], reqs[3], reqs[5]):
        _check_routed(out, r, base, registry, root)
    assert_clean(engine)
    assert registry.users("cmed") == registry.users("claw") == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["chunked-prefill-off", "chunked-prefill-on"])
def test_context_prompts_run_in_capped_chunks(routed, monkeypatch, chunked):
    """A context-routed prompt keeps every position's logits, so its chunks are capped (CONTEXT_CHUNK_TOKENS),
    even with chunked prefill off; the state carries across them and every token equals the reference."""
    import server.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "CONTEXT_CHUNK_TOKENS", 5)
    base, registry, root = routed
    engine = Engine(base, registry, EngineConfig(block_size=4, enable_chunked_prefill=chunked))
    reqs = [_routed(base, "a", LONG, "cmed", 5), _routed(base, "b", TEXT, "claw", 4),
            GenerationRequest("c", prompt(base, LONG),
                              SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                              Mixture.one("cmed", 0.5))]
    sizes: list[int] = []
    original = engine.runner.prefill

    def prefill(rows, chunks):
        sizes.extend(c.end - c.start[None] for c in chunks if c.seq.context_routed and not c.decode)
        return original(rows, chunks)

    monkeypatch.setattr(engine.runner, "prefill", prefill)
    out = run(engine, reqs)
    assert max(sizes) == 5 and len(sizes) >= len(reqs[0].prompt_token_ids) // 5
    for r in reqs[:2]:
        _check_routed(out, r, base, registry, root)
    assert_clean(engine)


def test_context_rows_bypass_the_prefix_cache_and_match_a_fresh_engine(routed):
    """A prompt whose prefix an earlier request cached (same memory, fixed α) is still computed whole for a
    context-routed row: its EMAs need every position's log-probs. Its state after the prompt equals the hand
    computation, and its tokens and log-probs equal a fresh engine's."""
    base, registry, root = routed
    config = EngineConfig(block_size=4)
    engine = Engine(base, registry, config)
    warm = GenerationRequest("w", prompt(base, LONG),
                             SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                             Mixture.one("cmed", 0.5))
    run(engine, [warm])
    r = _routed(base, "r", LONG + " today", "cmed", 6)
    seq = engine.add_request(r)
    assert seq.context_routed and engine.scheduler._lookup(seq) == {None: [], "cmed": []}
    ids = list(r.prompt_token_ids)
    assert any(engine.runner.kv(None).match(ids, (len(ids) - 1) // 4))  # the prefix is there to be hit
    out = {"r": [o for o in engine.step().outputs if o.request_id == "r"]}  # the prompt, and its first token
    state = engine.context.of("cmed", DECAYS)[seq.row].clone()
    full = [*ids, seq.token_ids[len(ids)]]
    with torch.no_grad():
        t = torch.tensor([full])
        b = torch.log_softmax(base.model(t).logits[0, :, : base.vocab_size].double(), -1)
        m = torch.log_softmax(registry.loaded("cmed").model(t).logits[0, :, : base.vocab_size].double(), -1)
    want = _hand_emas([(m[s, full[s + 1]] - b[s, full[s + 1]]).item() for s in range(len(full) - 1)],
                      DECAYS)[-1]
    assert (state - want).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="context"):  # its state would keep the forgotten tokens
        engine.rollback(seq, len(ids))
    while engine.has_unfinished():
        out["r"] += [o for o in engine.step().outputs if o.request_id == "r"]
    fresh = run(Engine(base, registry, config), [r])
    got, ref = logprobs_of(out["r"]), logprobs_of(fresh["r"])
    assert [lp.token_id for lp in got] == [lp.token_id for lp in ref]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, ref, strict=True)) <= 1e-6
    _check_routed(fresh, r, base, registry, root)
    assert_clean(engine)


def test_preempted_context_rows_recompute_their_state(routed):
    """With pages for barely two rows, context-routed rows are preempted and recomputed from the start (their
    generated tokens too, so their EMAs): outputs equal a roomy engine's and the reference. One memory for
    them all, so a re-admitted row's slot holds what an earlier row left in that memory's state (it is
    reset)."""
    base, registry, root = routed
    reqs = [_routed(base, f"p{i}", f"The patient number {i} was", m, 24)
            for i, m in enumerate(["rmed", "cmed", "cmed", "cmed"])]
    roomy = run(Engine(base, registry, EngineConfig(block_size=2)), reqs)
    preemptions = []

    class Count:
        def __getattr__(self, name):
            return lambda *a: preemptions.append(a[1]) if name == "on_kv_cache" else None

    tight = Engine(base, registry, EngineConfig(block_size=2, num_gpu_blocks_override=60), observer=Count())
    seqs = []
    out = run(tight, reqs, after_step=lambda e: seqs.extend(s for s in e.scheduler.running if s not in seqs))
    assert sum(preemptions) > 0 and any(s.num_preemptions for s in seqs if s.context_routed)
    for r in reqs:
        got, ref = logprobs_of(out[r.request_id]), logprobs_of(roomy[r.request_id])
        assert [lp.token_id for lp in got] == [lp.token_id for lp in ref]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(got, ref, strict=True)) <= 1e-4
    for r in reqs:
        _check_routed(out, r, base, registry, root)
    assert_clean(tight)


def test_echo_of_a_context_router_follows_its_emas(routed):
    base, registry, root = routed
    engine = Engine(base, registry, EngineConfig(block_size=4))
    r = GenerationRequest("e", prompt(base, LONG),
                          SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=3,
                                         logprobs=base.vocab_size), Mixture.auto("claw"))
    out = run(engine, [r])
    _check_echo(out, r, base, registry, root, "claw")
    _check_routed(out, r, base, registry, root)


def _check_echo(out, r: GenerationRequest, base, registry, root, name: str, top: int = 0) -> None:
    """The prompt log-probs of echo request `r` (and, with `top`, its top alternatives) against the
    reference."""
    plps = out[r.request_id][0].prompt_logprobs
    ids = list(r.prompt_token_ids)
    ref = _reference(base, registry, root, name, ids)
    for t in range(1, len(ids)):
        assert abs(plps[t].logprob - ref[t - 1, ids[t]].item()) <= 1e-4
        if top:
            assert [i for i, _ in plps[t].top] == ref[t - 1].topk(top).indices.tolist()


def test_routed_rows_do_not_draft_and_echo_follows_the_router(routed):
    base, registry, root = routed
    engine = Engine(base, registry, EngineConfig(block_size=4, speculative_tokens=3))
    r = GenerationRequest("e", prompt(base, TEXT), SamplingParams(max_tokens=0, prompt_logprobs=3),
                          Mixture.auto("rmed"))
    seq = engine.add_request(r)
    assert not seq.speculative and seq.base_weight == 1.0
    engine.abort_request("e")
    out = run(engine, [r])
    _check_echo(out, r, base, registry, root, "rmed", top=3)


def test_engine_refuses_auto_alpha_without_a_router(routed):
    base, registry, _ = routed
    engine = Engine(base, registry, EngineConfig(block_size=4))
    with pytest.raises(InvalidRequestError) as exc:
        engine.add_request(GenerationRequest("x", prompt(base, "The"), SamplingParams(max_tokens=2),
                                             Mixture.auto("med")))
    assert exc.value.code == "memory_has_no_router" and registry.users("med") == 0
    with pytest.raises(InvalidRequestError):
        engine.add_perplexity(PerplexityRequest("p", (prompt(base, TEXT),), (Mixture.auto("med"),)))
    assert registry.users("med") == 0
    assert_clean(engine)


def test_one_host_read_per_decode_step_with_a_router(routed, monkeypatch):
    base, registry, _ = routed
    engine = Engine(base, registry, EngineConfig(block_size=2))
    for r in [_routed(base, "a", "The patient was", "rmed", 30), _routed(base, "c", "The court", "cmed", 30),
              GenerationRequest("b", prompt(base, "The court"),
                                SamplingParams(max_tokens=30, temperature=0.8, seed=1, ignore_eos=True),
                                Mixture.one("rmed", 0.4))]:
        engine.add_request(r)
    for _ in range(3):
        engine.step()
    assert host_reads(engine, 10, monkeypatch) == ["fetch"] * 10
    for rid in ("a", "b", "c"):
        engine.abort_request(rid)
    assert registry.users("rmed") == registry.users("cmed") == 0


# ---------------------------------------------------------------- perplexity: server = toolkit = reference


@torch.no_grad()
def test_perplexity_auto_equals_the_toolkit_evaluation_and_the_reference(routed):
    base, registry, root = routed
    ids = list(prompt(base, " ".join([TEXT] * 3)))
    context, stride = 16, 8
    engine = Engine(base, registry, EngineConfig(block_size=4))
    job = engine.add_perplexity(PerplexityRequest("p", (tuple(ids),), (Mixture.auto("rmed"),),
                                                  context_length=context, stride=stride, token_logprobs=2))
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
                        EvalConfig(context=context, stride=stride), progress=False)
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
    engine.add_perplexity(PerplexityRequest("q", (tuple(ids),), (Mixture.auto("rmed"),),
                                            context_length=context, stride=stride))
    while not (result := engine.step()).jobs:
        pass
    assert result.jobs[0].error is None
    assert abs(result.jobs[0].result.documents[0].mixed[0].mean_nll - server_nll) <= 1e-6
    assert registry.users("rmed") == 0


@torch.no_grad()
def test_perplexity_auto_with_context_equals_the_toolkit_and_the_reference(routed):
    """The EMAs run over the document's scored positions in text order, window batch after window batch: the
    server's NLL equals the toolkit's evaluation (which runs them over the whole text at once) and the hand
    one."""
    base, registry, root = routed
    ids = list(prompt(base, " ".join([LONG] * 4)))
    context, stride = 16, 8
    engine = Engine(base, registry, EngineConfig(block_size=4))
    engine.add_perplexity(PerplexityRequest("p", (tuple(ids),), (Mixture.auto("cmed"),),
                                            context_length=context, stride=stride, token_logprobs=2))
    while not (result := engine.step()).jobs:
        pass
    (done,) = result.jobs
    assert done.error is None
    doc = done.result.documents[0]
    scored = score_text(base.model, registry.loaded("cmed").model, np.asarray(ids), base.vocab_size, "t",
                        EvalConfig(context=context, stride=stride), progress=False)
    toolkit_nll = evaluate_router(load_router(root / "cmed"), scored, (0.5,), 0.5)["router_nll"]
    assert abs(doc.mixed[0].mean_nll - toolkit_nll) <= 1e-4
    from memories.perplexity import sliding_windows

    rows = []  # (base log-probs [V], memory log-probs [V], target) of every scored position, in text order
    for w in sliding_windows(len(ids), context, stride):
        t = torch.tensor([ids[w.begin : w.end]])
        bl = base.model(t).logits[0, :, : base.vocab_size].double()
        ml = registry.loaded("cmed").model(t).logits[0, :, : base.vocab_size].double()
        rows += [(bl[p - w.begin - 1], ml[p - w.begin - 1], ids[p]) for p in range(w.score_from, w.end)]
    bl, ml = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    y = torch.tensor([r[2] for r in rows])
    b_t = torch.log_softmax(bl, -1).gather(-1, y[:, None])[:, 0]
    m_t = torch.log_softmax(ml, -1).gather(-1, y[:, None])[:, 0]
    a = _hand_alpha(root / "cmed", bl, ml, _hand_emas((m_t - b_t).tolist(), DECAYS)[:-1])
    per_token = torch.log(a * m_t.exp() + (1 - a) * b_t.exp())
    assert abs(doc.mixed[0].mean_nll + per_token.mean().item()) <= 1e-4
    assert max(abs(a - b) for a, b in zip(doc.tokens.mixed, per_token.tolist(), strict=True)) <= 1e-4
    with pytest.raises(InvalidRequestError) as exc:  # the EMAs start at the document's start
        engine.add_perplexity(PerplexityRequest("q", (tuple(ids),), (Mixture.auto("cmed"),),
                                                context_length=context, stride=stride, first_window=1))
    assert exc.value.param == "first_window"
    assert registry.users("cmed") == 0


def test_fit_router_reads_the_context_of_the_whole_text(routed):
    """fit_router computes the context features over each whole text before its fit/select split, and the
    fitted router's evaluation reads them the same way (`router_inputs`)."""
    base, registry, _ = routed
    ids = np.asarray(prompt(base, " ".join([LONG] * 6)))
    scored = score_text(base.model, registry.loaded("cmed").model, ids, base.vocab_size, "t",
                        EvalConfig(context=16, stride=8), progress=False)
    router, summary = fit_router([scored], 0.5, FitConfig(hidden=(0,), max_steps=20), progress=False)
    assert router.context_decays == DEFAULT_CONTEXT_DECAYS and len(router.mean) == len(FEATURES) + 2
    assert summary["positions_fit"] + summary["positions_select"] == len(scored.base)
    rep = evaluate_router(router, scored, (0.5,), 0.5)
    assert math.isfinite(rep["router_ppl"])


# ---------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def routed_server(routed, zoo):
    _, _, root = routed
    config = ServerConfig(model=ModelConfig(str(zoo.base)),
                          memories=(MemorySpec("rmed", str(root / "rmed")),
                                    MemorySpec("med", str(zoo.mem_llama))))
    with InProcessServer(config) as s:
        yield s


def test_api_auto_alpha(routed_server, routed):
    base, registry, root = routed
    s = routed_server
    cards = {c["id"]: c for c in s.get("/v1/models").json()["data"]}
    assert cards["rmed"]["router"] is True and cards["med"]["router"] is False
    r = s.post("/v1/completions", {"prompt": TEXT, "memory": "rmed", "alpha": "auto", "max_tokens": 0,
                                   "echo": True, "logprobs": 0})
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
    g = s.post("/v1/completions",
               {"prompt": "The patient", "model": "rmed", "alpha": "auto", "max_tokens": 3})
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
    ))
    common = ["memory", "router", "--memory", str(mem), "--base", str(zoo.base), "--quiet", "--context", "32"]
    assert toolkit([*common, "--text", f"seen={text}"]) == 2
    assert "comes from a source of this memory's datastore" in capsys.readouterr().err
    assert not (mem / ROUTER_WEIGHTS).exists()
    assert toolkit([*common, "--text", str(text), "--eval-text", f"other={text}",
                    "--alphas", "0.2,0.5,0.8"]) == 0
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
    assert toolkit(["memory", "router", "--memory", str(other), "--base", str(zoo.base), "--from", str(mem),
                    "--quiet", "--context", "32",
                    "--eval-text", f"x={text}"]) == 0  # fmt: skip  # flag/value pairs on one line
    copied = load_router(other, read_manifest(other).router)
    x = torch.randn(5, len(FEATURES) + len(DEFAULT_CONTEXT_DECAYS))  # the default: with the context features
    assert router.context_decays == copied.context_decays == DEFAULT_CONTEXT_DECAYS
    assert torch.equal(router.logit(x), copied.logit(x))
    # --no-context: the 8 distribution features only, as routers were before.
    assert toolkit([*common, "--text", str(text), "--no-context"]) == 0
    plain = load_router(mem, read_manifest(mem).router)
    assert plain.context_decays == () and plain.config.features == FEATURES
    assert read_manifest(mem).router["context_decays"] == []
