"""Engine correctness against independent references (full no-cache forwards, HF generate)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from server.config import EngineConfig, ModelConfig
from server.engine import Engine
from server.errors import ConflictError, InvalidRequestError, MemoryLoadError, NotFoundError
from server.loader import load_base
from server.registry import MemoryRegistry
from server.request import FinishReason, GenerationRequest, SamplingParams
from server.sequence import IncrementalDetokenizer
from tests.engine_helpers import logprobs_of, reference_logp, run, tokens_of


@pytest.fixture(scope="module")
def setup(zoo):
    base = load_base(ModelConfig(str(zoo.base)))
    registry = MemoryRegistry(base)
    registry.load("med", str(zoo.mem_llama))
    registry.load("law", str(zoo.mem_qwen_padded))
    registry.load("fin", str(zoo.mem_gpt2))
    return base, registry


def engine_for(setup, **kw) -> Engine:
    base, registry = setup
    return Engine(base, registry, EngineConfig(**kw))


def prompt(base, text: str) -> tuple[int, ...]:
    return tuple(base.tokenizer(text).input_ids)


def greedy(rid, ids, n=12, memory=None, alpha=0.0, **kw):
    return GenerationRequest(rid, ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw), memory, alpha)


@pytest.mark.parametrize("memory", [None, "med", "law"])
def test_pure_endpoints_match_hf_generate(setup, memory):
    """alpha=0 follows the base's greedy generate; alpha=1 follows the memory's."""
    base, registry = setup
    ids = prompt(base, "The committee expects inflation")
    model = base.model if memory is None else registry._entries[memory].loaded.model
    rows = model.get_output_embeddings().weight.shape[0]
    # Padded rows (the Qwen2 memory) must never win: tell generate so, as the engine does by construction.
    padded = {"suppress_tokens": list(range(base.vocab_size, rows))} if rows > base.vocab_size else {}
    # 40 tokens: past the KV buffers' initial spare columns, so in-place growth is exercised too.
    # ignore_eos on our side = no EOS at all on HF's (min_new_tokens would *suppress* EOS instead).
    ref = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0, **padded)
    ref = ref[0, len(ids) :].tolist()
    alpha = 0.0 if memory is None else 1.0
    engine = engine_for(setup)
    out = run(engine, [greedy("r", ids, n=40, memory=memory, alpha=alpha), greedy("noise", prompt(base, "x y"), memory="fin", alpha=0.5)])
    assert tokens_of(out["r"]) == ref


def test_mixed_distribution_matches_full_forward_reference(setup):
    """Every step of every sequence, in a mixed batch with joins mid-way, equals the formula applied
    to full no-cache forwards of both models (full distribution via logprobs = vocab)."""
    base, registry = setup
    vocab = base.vocab_size
    specs = [
        ("a", "The patient was given a dose", "med", 0.6, 0),
        ("b", "The court held", "law", 0.3, 0),  # padded-vocabulary Qwen2 memory
        ("c", "Once upon a time there was a little house", None, 0.0, 0),
        ("d", "inflation", "fin", 0.9, 2),  # joins mid-way
        ("e", "The statute applies to the contract and", "med", 1.0, 3),
        ("f", "The patient", "med", 0.25, 3),
    ]
    reqs = {rid: greedy(rid, prompt(base, text), n=6, memory=m, alpha=a, logprobs=vocab) for rid, text, m, a, _ in specs}
    join: dict[int, list] = {}
    for rid, _, _, _, at in specs:
        if at:
            join.setdefault(at, []).append(reqs[rid])
    out = run(engine_for(setup), [reqs[rid] for rid, *_, at in specs if at == 0], join)
    worst = 0.0
    for rid, _, memory, alpha, _ in specs:
        mem_model = registry._entries[memory].loaded.model if memory else None
        context = list(reqs[rid].prompt_token_ids)
        lps = logprobs_of(out[rid])
        assert len(lps) == 6
        for lp in lps:
            engine_logp = torch.full((vocab,), float("-inf"))
            ids, vals = zip(*lp.top, strict=True)
            engine_logp[list(ids)] = torch.tensor(vals)
            ref = reference_logp(base.model, mem_model, context, alpha, vocab)
            worst = max(worst, (engine_logp - ref).abs().max().item())
            context.append(lp.token_id)
    assert 0.0 < worst <= 1e-4, worst  # > 0: the two paths are really different computations


def test_same_result_alone_and_in_busy_batch(setup):
    base, _ = setup
    ids = prompt(base, "Once upon a time")
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    target = [greedy("g", ids, memory="med", alpha=0.6), GenerationRequest("s", ids, sampled, "law", 0.5)]
    alone = run(engine_for(setup), target)
    crowd = [
        GenerationRequest(f"n{i}", prompt(base, f"noise {i} " * (i + 1)), SamplingParams(max_tokens=8 + i, temperature=1.0), m, 0.5)
        for i, m in enumerate(["med", "law", "fin", None, "med"])
    ]
    busy = run(engine_for(setup), crowd[:3] + target, {1: crowd[3:]})
    assert tokens_of(busy["g"]) == tokens_of(alone["g"])
    assert tokens_of(busy["s"]) == tokens_of(alone["s"])
    other_seed = run(engine_for(setup), [GenerationRequest("s", ids, SamplingParams(max_tokens=10, temperature=0.9, seed=99, ignore_eos=True), "law", 0.5)])
    assert tokens_of(other_seed["s"]) != tokens_of(alone["s"])


def test_foreign_tokenizer_refused_and_registry_unchanged(setup, zoo):
    _, registry = setup
    before = [m.name for m in registry.list()]
    with pytest.raises(MemoryLoadError, match="tokenizer"):
        registry.load("alien", str(zoo.mem_foreign))
    assert [m.name for m in registry.list()] == before


def test_padded_vocabulary_never_gets_probability(setup):
    base, registry = setup
    lm = registry._entries["law"].loaded
    assert lm.model.get_output_embeddings().weight.shape[0] > base.vocab_size
    out = run(engine_for(setup), [greedy("p", prompt(base, "The court"), n=4, memory="law", alpha=1.0, logprobs=base.vocab_size)])
    for lp in logprobs_of(out["p"]):
        assert len(lp.top) == base.vocab_size and all(t < base.vocab_size for t, _ in lp.top)
        total = torch.logsumexp(torch.tensor([v for _, v in lp.top]), 0).item()
        assert abs(total) < 1e-4  # the vocabulary carries all the mass


def test_stop_conditions(setup):
    base, _ = setup
    ids = prompt(base, "Once upon a time")
    free = run(engine_for(setup), [greedy("f", ids, n=12)])["f"]
    toks, text = tokens_of(free), "".join(o.new_text for o in free)
    out = run(engine_for(setup), [greedy("t", ids, n=12, stop_token_ids=(toks[3],))])["t"]
    assert tokens_of(out) == toks[: toks.index(toks[3]) + 1] and out[-1].finish_reason is FinishReason.STOP
    assert out[-1].stop_reason == toks[3]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        out = run(engine_for(setup), [greedy("s", ids, n=12, stop=(stop,))])["s"]
        assert "".join(o.new_text for o in out) == text[: text.index(stop)]
        assert out[-1].finish_reason is FinishReason.STOP and out[-1].stop_reason == stop
    eos_model = run(engine_for(setup), [GenerationRequest("e", ids, SamplingParams(max_tokens=5, temperature=0))])["e"]
    assert eos_model[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert len(tokens_of(eos_model)) <= 5


def test_validation_errors(setup):
    base, _ = setup
    engine = engine_for(setup)
    with pytest.raises(InvalidRequestError, match="out of vocabulary"):
        engine.add_request(greedy("x", (base.vocab_size,)))
    with pytest.raises(InvalidRequestError, match="maximum context length is 512"):
        engine.add_request(greedy("x", (1, 2, 3), n=510))
    with pytest.raises(InvalidRequestError, match="alpha"):
        engine.add_request(greedy("x", (1, 2), memory="med", alpha=1.5))
    with pytest.raises(NotFoundError):
        engine.add_request(greedy("x", (1, 2), memory="nope", alpha=0.5))
    assert not engine.has_unfinished()


def test_abort_frees_slot_and_cache(setup):
    base, registry = setup
    engine = engine_for(setup)
    engine.add_request(greedy("a", prompt(base, "The patient"), n=50, memory="med", alpha=0.5))
    engine.add_request(greedy("b", prompt(base, "The court"), n=5))
    engine.step()
    engine.step()
    users = registry.users("med")
    out = engine.abort_request("a")
    assert out is not None and out.finished and out.finish_reason is FinishReason.ABORT
    assert registry.users("med") == users - 1
    assert engine.runner.mem_caches == {} and engine.runner.base_cache.seq_ids != []
    while engine.has_unfinished():
        engine.step()
    assert len(engine.runner.base_cache) == 0


def test_memory_failure_fails_only_its_requests(setup, zoo):
    base, _ = setup
    registry = MemoryRegistry(base)
    registry.load("med", str(zoo.mem_llama))
    registry.load("fin", str(zoo.mem_gpt2))
    engine = Engine(base, registry, EngineConfig())
    reqs = [greedy("ok", prompt(base, "a b c"), n=6, memory="fin", alpha=0.5), greedy("bad", prompt(base, "a b"), n=6, memory="med", alpha=0.5)]
    alone = run(Engine(base, registry, EngineConfig()), [reqs[0]])
    fail_at = {"n": 0}

    def explode(module, args, kwargs):
        fail_at["n"] += 1
        if fail_at["n"] == 3:
            raise torch.OutOfMemoryError("simulated OOM")

    handle = registry._entries["med"].loaded.model.register_forward_pre_hook(explode, with_kwargs=True)
    try:
        out = run(engine, reqs)
    finally:
        handle.remove()
    assert out["bad"][-1].finish_reason is FinishReason.ERROR and "simulated OOM" in out["bad"][-1].error
    assert tokens_of(out["ok"]) == tokens_of(alone["ok"]) and out["ok"][-1].finish_reason is FinishReason.LENGTH
    assert registry.users("med") == 0


def test_unload_while_in_use_finishes_then_frees(setup, zoo):
    base, _ = setup
    registry = MemoryRegistry(base)
    registry.load("med", str(zoo.mem_llama))
    engine = Engine(base, registry, EngineConfig())
    engine.add_request(greedy("a", prompt(base, "The patient"), n=8, memory="med", alpha=0.5))
    engine.step()
    model_ref = weakref.ref(registry._entries["med"].loaded.model)
    registry.unload("med")
    with pytest.raises(NotFoundError):
        engine.add_request(greedy("b", prompt(base, "x"), n=2, memory="med", alpha=0.5))
    assert "med" not in registry and model_ref() is not None
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].num_output_tokens == 8
    gc.collect()
    assert model_ref() is None and registry._entries == {}


def test_echo_prompt_logprobs_are_mixed(setup):
    base, registry = setup
    ids = prompt(base, "The court held that the statute")
    req = GenerationRequest("e", ids, SamplingParams(max_tokens=0, prompt_logprobs=3), "law", 0.4)
    out = run(engine_for(setup), [req])["e"]
    plps = out[0].prompt_logprobs
    assert plps[0] is None and len(plps) == len(ids) and out[-1].num_output_tokens == 0
    mem = registry._entries["law"].loaded.model
    for t in range(1, len(ids)):
        ref = reference_logp(base.model, mem, list(ids[:t]), 0.4, base.vocab_size)
        assert abs(plps[t].logprob - ref[ids[t]].item()) < 1e-4
        assert [i for i, _ in plps[t].top] == ref.topk(3).indices.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: exercises the two-stream path")
def test_cuda_streams_path_matches_cpu_reference(zoo):
    base = load_base(ModelConfig(str(zoo.base), dtype="float32", device="cuda"))
    registry = MemoryRegistry(base)
    registry.load("med", str(zoo.mem_llama))
    engine = Engine(base, registry, EngineConfig(use_cuda_streams=True))
    assert engine.runner.side_stream is not None
    ids = prompt(base, "The patient was given")
    out = run(engine, [greedy("a", ids, n=6, memory="med", alpha=0.6, logprobs=base.vocab_size), greedy("b", ids, n=6)])
    mem = registry._entries["med"].loaded.model
    context = list(ids)
    for lp in logprobs_of(out["a"]):
        ref = reference_logp(base.model, mem, context, 0.6, base.vocab_size).cpu()
        ids_, vals = zip(*lp.top, strict=True)
        got = torch.full((base.vocab_size,), float("-inf"))
        got[list(ids_)] = torch.tensor(vals)
        assert (got - ref).abs().max().item() < 1e-3
        context.append(lp.token_id)


def test_reserved_and_invalid_memory_names_refused(setup, zoo):
    _, registry = setup
    for name in ("none", "other", "a b", "", "../x"):
        with pytest.raises(MemoryLoadError):
            registry.load(name, str(zoo.mem_gpt2))


def test_reload_while_draining_says_retry(setup, zoo):
    base, _ = setup
    registry = MemoryRegistry(base)
    registry.load("med", str(zoo.mem_llama))
    registry.acquire("med")
    registry.unload("med")
    with pytest.raises(ConflictError, match="being unloaded") as err:
        registry.load("med", str(zoo.mem_llama))
    assert err.value.retry_after == 1
    registry.release("med")
    assert registry.load("med", str(zoo.mem_llama)).name == "med"


def test_eos_ends_the_text_without_appearing_in_it(setup):
    base, _ = setup
    tok = base.tokenizer
    ids = list(prompt(base, "Once upon a time"))
    detok = IncrementalDetokenizer(tok, ids)
    words = list(prompt(base, " there was"))
    text = "".join(detok.step(ids + words[: i + 1]) for i in range(len(words)))
    assert text == " there was"
    assert detok.step(ids + words + [min(base.eos_token_ids)]) == ""  # vLLM's skip_special_tokens default
