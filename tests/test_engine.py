"""Engine correctness against independent references (full no-cache forwards, HF generate)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from memories.mixing import Mixture
from server.config import EngineConfig, ModelConfig
from server.engine import Engine
from server.errors import ConflictError, InvalidRequestError, MemoryLoadError, NotFoundError
from server.loader import load_base
from server.output import IncrementalDetokenizer
from server.registry import MemoryRegistry
from server.request import FinishReason, GenerationRequest, SamplingParams
from server.sampler import apply_top_k_top_p
from server.scheduler import StepKind
from server.validation import mixture_errors
from tests.engine_helpers import (
    assert_clean,
    assert_pages_owned_once,
    chi_square,
    chi_square_critical,
    dense_logp,
    engine_for,
    greedy,
    host_reads,
    logprobs_of,
    prompt,
    reference_logp,
    run,
    tokens_of,
    worst_error,
)


@pytest.mark.parametrize("memory", [None, "med", "law"])
def test_pure_endpoints_match_hf_generate(setup, memory):
    """alpha=0 follows the base's greedy generate; alpha=1 follows the memory's."""
    base, registry = setup
    ids = prompt(base, "The committee expects inflation")
    model = base.model if memory is None else registry.loaded(memory).model
    rows = model.get_output_embeddings().weight.shape[0]
    # Padded rows (the Qwen2 memory) must never win: tell generate so, as the engine does by construction.
    padded = {"suppress_tokens": list(range(base.vocab_size, rows))} if rows > base.vocab_size else {}
    # ignore_eos on our side = no EOS at all on HF's (min_new_tokens would *suppress* EOS instead).
    ref = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                         pad_token_id=0, **padded)
    ref = ref[0, len(ids) :].tolist()
    alpha = 0.0 if memory is None else 1.0
    # block_size 4: 40 tokens cross many pages of both caches.
    engine = engine_for(setup, block_size=4)
    out = run(engine, [greedy("r", ids, n=40, memory=memory, alpha=alpha),
                       greedy("noise", prompt(base, "x y"), memory="fin", alpha=0.5)])
    assert tokens_of(out["r"]) == ref
    assert_clean(engine)


CHURN = [  # rid, text, memory, alpha, tokens, joins before step
    ("a", "The patient was given a dose", "med", 0.6, 9, 0),
    ("b", "The court held", "law", 0.3, 3, 0),  # padded-vocabulary Qwen2 memory; leaves early
    ("c", "Once upon a time there was a little house", None, 0.0, 7, 0),
    ("d", "inflation", "fin", 0.9, 5, 2),
    ("e", "The statute applies to the contract and", "med", 1.0, 4, 3),
    ("f", "The patient", "med", 0.25, 8, 3),
    ("g", "The committee", "law", 0.5, 2, 5),
    ("h", "rates rose", "fin", 0.0, 3, 6),  # a memory at alpha 0 runs the base alone
    ("i", "x", None, 0.0, 4, 8),
]


@pytest.mark.parametrize(
    "config",
    [
        {},  # default pages (16 base tokens)
        {"block_size": 2},  # rows cross pages every step or two, in every model
        # the long row alone nearly fills it: waits, preemptions
        {"block_size": 2, "num_gpu_blocks_override": 235, "max_num_seqs": 4},
    ],
    ids=["default", "small-pages", "tight-cache"],
)
def test_mixed_distribution_matches_full_forward_reference_under_churn(setup, config):
    """Every step of every sequence, in a batch where rows join and leave every few steps with different
    lengths and memories, equals the formula applied to full no-cache forwards of both models."""
    base, _ = setup
    vocab = base.vocab_size
    long_text = " ".join(["the court held that the patient was given a dose of the statute"] * 9)
    # past the first attended-blocks bucket (256 tokens)
    specs = [*CHURN, ("long", long_text, "med", 0.5, 3, 1)]
    reqs = {rid: greedy(rid, prompt(base, text), n=n, memory=m, alpha=a, logprobs=vocab)
            for rid, text, m, a, n, _ in specs}
    assert 280 < len(reqs["long"].prompt_token_ids) < 300  # the tight cache below is sized for it
    join: dict[int, list] = {}
    for rid, *_, at in specs:
        if at:
            join.setdefault(at, []).append(reqs[rid])
    engine = engine_for(setup, **config)
    out = run(engine, [reqs[rid] for rid, *_, at in specs if at == 0], join,
              after_step=assert_pages_owned_once)
    ref_specs = [(rid, reqs[rid].prompt_token_ids, m, a, n) for rid, _, m, a, n, _ in specs]
    worst = worst_error(out, ref_specs, setup)
    assert 0.0 < worst <= 1e-4, worst  # > 0: the two paths are really different computations
    assert_clean(engine)


def test_an_echo_row_decoding_in_a_mixed_step_does_not_fail_the_prompts_beside_it(setup):
    """An echo request with max_tokens > 0 decodes as a one-token segment of a MIXED step once its prompt ran;
    that segment is its next token only (its prompt log-probs were sent), so a prompt chunk beside it runs (it
    used to trip the echo assertion: the step's prompts failed, and under tensor parallelism the server)."""
    base, registry = setup
    engine = Engine(base, registry,
                    EngineConfig(block_size=4, max_num_batched_tokens=8, enable_chunked_prefill=True))
    echo = GenerationRequest("e", prompt(base, "The court"),
                             SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=1),
                             Mixture.one("med", 0.5))
    other = greedy("x", prompt(base, "The patient was given a dose of the drug and"), n=3, memory="med",
                   alpha=0.5)
    kinds = []
    step = engine.step
    engine.step = lambda: kinds.append((r := step()).kind) or r  # type: ignore[method-assign]
    out = run(engine, [echo], join={1: [other]})
    assert StepKind.MIXED in kinds
    assert all(o.finish_reason in (None, FinishReason.LENGTH) for outs in out.values() for o in outs)
    assert tokens_of(out["x"]) == tokens_of(run(engine_for(setup), [other])["x"])
    assert out["e"][0].prompt_logprobs is not None
    assert_clean(engine)


def test_preemption_keeps_greedy_outputs(setup):
    """With pages for barely two sequences, rows are preempted and recomputed; outputs do not change."""
    base, _ = setup
    reqs = [greedy(f"p{i}", prompt(base, f"The patient number {i} was"), n=30, memory=m, alpha=0.5)
            for i, m in enumerate(["med", "law", "fin", None, "med"])]
    roomy = run(engine_for(setup), reqs)
    preemptions = []

    class Count:
        def __getattr__(self, name):
            return lambda *a: preemptions.append(a[1]) if name == "on_kv_cache" else None

    base_, registry = setup
    tight = Engine(base_, registry, EngineConfig(block_size=2, num_gpu_blocks_override=70), observer=Count())
    out = run(tight, reqs)
    assert sum(preemptions) > 0
    for r in reqs:
        assert tokens_of(out[r.request_id]) == tokens_of(roomy[r.request_id])
    assert_clean(tight)


def test_same_result_alone_and_in_busy_batch(setup):
    base, _ = setup
    ids = prompt(base, "Once upon a time")
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    target = [greedy("g", ids, memory="med", alpha=0.6),
              GenerationRequest("s", ids, sampled, Mixture.one("law", 0.5))]
    alone = run(engine_for(setup), target)
    crowd = [
        GenerationRequest(f"n{i}", prompt(base, f"noise {i} " * (i + 1)),
                          SamplingParams(max_tokens=8 + i, temperature=1.0), Mixture.single(m, 0.5))
        for i, m in enumerate(["med", "law", "fin", None, "med"])
    ]
    busy = run(engine_for(setup), crowd[:3] + target, {1: crowd[3:]})
    assert tokens_of(busy["g"]) == tokens_of(alone["g"])
    assert tokens_of(busy["s"]) == tokens_of(alone["s"])
    other_seed = run(engine_for(setup), [
        GenerationRequest("s", ids, SamplingParams(max_tokens=10, temperature=0.9, seed=99, ignore_eos=True),
                          Mixture.one("law", 0.5))
    ])
    assert tokens_of(other_seed["s"]) != tokens_of(alone["s"])


@pytest.mark.parametrize("params", [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.8},
                                    {"temperature": 1.3, "top_k": 5}])
def test_sampled_tokens_follow_the_exact_mixture(setup, params):
    """4,000 seeded draws of the first token: a chi-square test against the mixture computed from full
    forwards of both models (with the same temperature / top-k / top-p transform)."""
    base, registry = setup
    ids = prompt(base, "The court held that")
    alpha, n = 0.6, 4000
    reqs = [GenerationRequest(f"s{i}", ids, SamplingParams(max_tokens=1, seed=i, ignore_eos=True, **params),
                              Mixture.one("law", alpha)) for i in range(n)]
    out = run(engine_for(setup), reqs)
    counts = torch.zeros(base.vocab_size)
    for r in reqs:
        counts[tokens_of(out[r.request_id])[0]] += 1
    logp = reference_logp(base.model, registry.loaded("law").model, list(ids), alpha, base.vocab_size)
    logits = (logp / params["temperature"]).unsqueeze(0)
    logits = apply_top_k_top_p(logits, torch.tensor([params.get("top_k", 0)]),
                               torch.tensor([params.get("top_p", 1.0)]))[0]
    stat, df = chi_square(counts, logits.softmax(-1))
    assert df >= 3, "the test needs several likely tokens"
    assert stat < chi_square_critical(df), (stat, df)


def test_foreign_tokenizer_refused_and_registry_unchanged(setup, zoo):
    _, registry = setup
    before = [m.name for m in registry.list()]
    with pytest.raises(MemoryLoadError, match="tokenizer"):
        registry.load("alien", str(zoo.mem_foreign))
    assert [m.name for m in registry.list()] == before


def test_padded_vocabulary_never_gets_probability(setup):
    base, registry = setup
    lm = registry.loaded("law")
    assert lm.model.get_output_embeddings().weight.shape[0] > base.vocab_size
    out = run(engine_for(setup), [greedy("p", prompt(base, "The court"), n=4, memory="law", alpha=1.0,
                                         logprobs=base.vocab_size)])
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
        engine = engine_for(setup)
        out = run(engine, [greedy("s", ids, n=12, stop=(stop,))])["s"]
        assert "".join(o.new_text for o in out) == text[: text.index(stop)]
        assert out[-1].finish_reason is FinishReason.STOP and out[-1].stop_reason == stop
        assert out[-1].num_output_tokens == len(tokens_of(out)) < 12
        assert_clean(engine)  # the engine ended the request when the stop string matched
    eos_model = run(engine_for(setup),
                    [GenerationRequest("e", ids, SamplingParams(max_tokens=5, temperature=0))])["e"]
    assert eos_model[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert len(tokens_of(eos_model)) <= 5


def test_validation_errors(setup):
    base, _ = setup
    engine = engine_for(setup)
    with pytest.raises(InvalidRequestError, match="out of vocabulary"):
        engine.add_request(greedy("x", (base.vocab_size,)))
    with pytest.raises(InvalidRequestError, match="maximum context length is 512"):
        engine.add_request(greedy("x", (1, 2, 3), n=510))
    # refused where the mixture is built
    with pytest.raises(InvalidRequestError, match="alpha"), mixture_errors():
        engine.add_request(greedy("x", (1, 2), memory="med", alpha=1.5))
    with pytest.raises(NotFoundError):
        engine.add_request(greedy("x", (1, 2), memory="nope", alpha=0.5))
    assert not engine.has_unfinished()


def test_request_larger_than_the_kv_cache_is_refused_and_a_flood_waits(setup):
    base, _ = setup
    # 40 pages of 4 base tokens: one request of 100 tokens with a memory cannot ever fit.
    engine = engine_for(setup, block_size=4, num_gpu_blocks_override=41, max_num_seqs=8)
    with pytest.raises(InvalidRequestError, match="KV cache") as err:
        engine.add_request(greedy("big", tuple(range(5, 85)), n=60, memory="med", alpha=0.5))
    assert err.value.code == "kv_cache_too_small" and not engine.has_unfinished()
    flood = [greedy(f"f{i}", prompt(base, f"flood {i} of requests"), n=20, memory=["med", "law", None][i % 3],
                    alpha=0.5)
             for i in range(12)]
    waited = run(engine, flood)
    roomy = run(engine_for(setup), flood)
    for r in flood:
        assert waited[r.request_id][-1].finish_reason is FinishReason.LENGTH
        assert tokens_of(waited[r.request_id]) == tokens_of(roomy[r.request_id])
    assert_clean(engine)


def test_abort_frees_slot_and_pages(setup):
    base, registry = setup
    engine = engine_for(setup)
    engine.add_request(greedy("a", prompt(base, "The patient"), n=50, memory="med", alpha=0.5))
    engine.add_request(greedy("b", prompt(base, "The court"), n=5))
    engine.step()
    engine.step()
    users = registry.users("med")
    used = engine.cache_usage()
    out = engine.abort_request("a")
    assert out is not None and out.finished and out.finish_reason is FinishReason.ABORT
    assert registry.users("med") == users - 1
    after = engine.cache_usage()
    assert after.free_slots == used.free_slots + 1 and after.free_pages > used.free_pages
    while engine.has_unfinished():
        engine.step()
    assert_clean(engine)


def test_rollback_truncates_both_caches_exactly(setup):
    """Decode, roll a row back by several tokens across page boundaries, decode again: the regenerated
    tokens and their distributions equal the reference for the shortened context."""
    base, registry = setup
    vocab = base.vocab_size
    engine = engine_for(setup, block_size=2)
    ids = prompt(base, "The patient was given")
    engine.add_request(greedy("r", ids, n=14, memory="med", alpha=0.7, logprobs=vocab))
    engine.add_request(greedy("other", prompt(base, "The court held that"), n=14, memory="law", alpha=0.4))
    for _ in range(10):
        engine.step()
    seq = engine.scheduler.find("r")
    first = list(seq.token_ids)
    keep = len(ids) + 3
    engine.rollback(seq, keep)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step().outputs if o.request_id == "r"]
    lps = [lp for o in outs for lp in (o.new_logprobs or ())]
    assert seq.token_ids[: len(first)] == first  # greedy: the same tokens again
    context = first[:keep]
    for lp in lps[-(len(seq.token_ids) - keep) :]:
        got = dense_logp(lp, vocab)
        ref = reference_logp(base.model, registry.loaded("med").model, context, 0.7, vocab)
        assert (got - ref).abs().max().item() <= 1e-4
        context.append(lp.token_id)
    assert_clean(engine)


def test_memory_failure_fails_only_its_requests(setup, zoo):
    base, _ = setup
    registry = MemoryRegistry(base)
    registry.load("med", str(zoo.mem_llama))
    registry.load("fin", str(zoo.mem_gpt2))
    engine = Engine(base, registry, EngineConfig())
    reqs = [greedy("ok", prompt(base, "a b c"), n=6, memory="fin", alpha=0.5),
            greedy("bad", prompt(base, "a b"), n=6, memory="med", alpha=0.5)]
    alone = run(Engine(base, registry, EngineConfig()), [reqs[0]])
    fail_at = {"n": 0}

    def explode(module, args, kwargs):
        fail_at["n"] += 1
        if fail_at["n"] == 3:
            raise torch.OutOfMemoryError("simulated OOM")

    handle = registry.loaded("med").model.register_forward_pre_hook(explode, with_kwargs=True)
    try:
        out = run(engine, reqs)
    finally:
        handle.remove()
    assert out["bad"][-1].finish_reason is FinishReason.ERROR and "simulated OOM" in out["bad"][-1].error
    assert (tokens_of(out["ok"]) == tokens_of(alone["ok"])
            and out["ok"][-1].finish_reason is FinishReason.LENGTH)
    assert registry.users("med") == 0
    assert_clean(engine)


def test_base_failure_in_prefill_fails_only_the_newcomers(setup):
    base, _ = setup
    engine = engine_for(setup)
    engine.add_request(greedy("running", prompt(base, "The patient"), n=8, memory="med", alpha=0.5))
    engine.step()
    engine.add_request(greedy("new", prompt(base, "The court"), n=8))

    def explode(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # a prefill (decode feeds one token per row)
            raise torch.OutOfMemoryError("simulated prefill OOM")

    handle = base.model.register_forward_pre_hook(explode, with_kwargs=True)
    try:
        outs = engine.step().outputs
    finally:
        handle.remove()
    # The running stream decodes first in the same step (vLLM's policy), then the newcomer's prompt fails.
    assert [o.request_id for o in outs] == ["running", "new"] and not outs[0].finished
    assert outs[1].finish_reason is FinishReason.ERROR
    rest = []
    while engine.has_unfinished():
        rest += engine.step().outputs
    assert rest[-1].request_id == "running" and rest[-1].finish_reason is FinishReason.LENGTH
    assert_clean(engine)


def test_unload_while_in_use_finishes_then_frees(setup, zoo):
    base, _ = setup
    registry = MemoryRegistry(base)
    registry.load("med", str(zoo.mem_llama))
    engine = Engine(base, registry, EngineConfig())
    engine.add_request(greedy("a", prompt(base, "The patient"), n=8, memory="med", alpha=0.5))
    engine.step()
    model_ref = weakref.ref(registry.loaded("med").model)
    registry.unload("med")
    with pytest.raises(NotFoundError):
        engine.add_request(greedy("b", prompt(base, "x"), n=2, memory="med", alpha=0.5))
    assert "med" not in registry and model_ref() is not None
    outs = []
    while engine.has_unfinished():
        outs += engine.step().outputs
    assert (outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
            and outs[-1].num_output_tokens == 8)
    gc.collect()
    assert model_ref() is None and registry.list() == []
    assert_clean(engine)


def test_echo_prompt_logprobs_are_mixed(setup):
    base, registry = setup
    ids = prompt(base, "The court held that the statute")
    req = GenerationRequest("e", ids, SamplingParams(max_tokens=0, prompt_logprobs=3),
                            Mixture.one("law", 0.4))
    out = run(engine_for(setup), [req])["e"]
    plps = out[0].prompt_logprobs
    assert plps[0] is None and len(plps) == len(ids) and out[-1].num_output_tokens == 0
    mem = registry.loaded("law").model
    for t in range(1, len(ids)):
        ref = reference_logp(base.model, mem, list(ids[:t]), 0.4, base.vocab_size)
        assert abs(plps[t].logprob - ref[ids[t]].item()) < 1e-4
        assert [i for i, _ in plps[t].top] == ref.topk(3).indices.tolist()


def test_one_host_read_per_steady_decode_step(setup, monkeypatch):
    """A probe on every Python-visible way a tensor reaches the host: a steady decode step (page crossings,
    log-probs, sampling, several memories) reads the device exactly once — the engine's `fetch`."""
    base, _ = setup
    engine = engine_for(setup, block_size=2)
    reqs = [
        greedy("a", prompt(base, "The patient was"), n=30, memory="med", alpha=0.6, logprobs=3),
        GenerationRequest("b", prompt(base, "The court"),
                          SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True),
                          Mixture.one("law", 0.4)),
        greedy("c", prompt(base, "Once upon"), n=30),
    ]
    for r in reqs:
        engine.add_request(r)
    for _ in range(3):  # the prefill and a first decode step (which builds the decode batch)
        engine.step()
    steps = 12
    assert host_reads(engine, steps, monkeypatch) == ["fetch"] * steps
    assert all(engine.scheduler.find(r.request_id).num_output_tokens == 3 + steps for r in reqs)


def test_cache_kv_ops_truncate_and_leak_free(setup):
    """Slot bookkeeping under aborts, errors and unloads: every page and slot comes back. (Without prefix
    caching: truncating into the prompt's published blocks is refused when it is on, see
    test_prefix_cache.)"""
    base, registry = setup
    engine = engine_for(setup, block_size=2, enable_prefix_caching=False)
    for i in range(6):
        engine.add_request(greedy(f"r{i}", prompt(base, f"request {i} about the patient"), n=20,
                                  memory=["med", "law", None][i % 3], alpha=0.5))
    for _ in range(4):
        engine.step()
    engine.abort_request("r0")
    engine.abort_request("r5")
    while engine.has_unfinished():
        engine.step()
    assert_clean(engine)
    kv = engine.runner.kv(None)
    engine.add_request(greedy("t", prompt(base, "a b c d e f g h"), n=20))
    for _ in range(6):
        engine.step()
    seq = engine.scheduler.find("t")
    held = engine.cache_usage().free_pages
    cached = int(kv.host_lengths[seq.slot])
    kv.truncate(seq.slot, 3)
    assert int(kv.host_lengths[seq.slot]) == 3 and kv.pages_missing(seq.slot, 4) == 0
    assert engine.cache_usage().free_pages == held + kv.blocks_for(cached) - kv.blocks_for(3)
    with pytest.raises(ValueError):
        kv.truncate(seq.slot, 4 + cached)
    engine.abort_request("t")
    assert_clean(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: exercises the two-stream path")
def test_cuda_streams_path_matches_cpu_reference(zoo):
    base = load_base(ModelConfig(str(zoo.base), dtype="float32", device="cuda"))
    registry = MemoryRegistry(base)
    registry.load("med", str(zoo.mem_llama))
    engine = Engine(base, registry, EngineConfig(use_cuda_streams=True))
    assert engine.runner.side_stream is not None
    ids = prompt(base, "The patient was given")
    out = run(engine, [greedy("a", ids, n=6, memory="med", alpha=0.6, logprobs=base.vocab_size),
                       greedy("b", ids, n=6)])
    mem = registry.loaded("med").model
    context = list(ids)
    for lp in logprobs_of(out["a"]):
        ref = reference_logp(base.model, mem, context, 0.6, base.vocab_size).cpu()
        got = dense_logp(lp, base.vocab_size)
        assert (got - ref).abs().max().item() < 1e-3
        context.append(lp.token_id)


def test_reserved_and_invalid_memory_names_refused(setup, zoo):
    _, registry = setup
    for name in ("none", "other", "auto", "a b", "", "../x"):
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



@pytest.mark.parametrize("engine_config", [{}, {"max_num_batched_tokens": 6}], ids=["whole", "chunked"])
def test_sliding_window_layers_match_the_reference(setup, tmp_path, engine_config):
    """A Qwen2 memory whose upper layers attend over an 8-token window: prompts and decodes past the window,
    and (chunked) prompt chunks and prefix-cache hits attending across the window's edge over cached pages."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from memories.manifest import Manifest, tokenizer_fingerprint, write_manifest

    base, _ = setup
    tok = base.tokenizer
    torch.manual_seed(9)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, use_sliding_window=True, sliding_window=8,
        max_window_layers=1, eos_token_id=tok.eos_token_id, initializer_range=0.3, tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    model.save_pretrained(tmp_path / "swa")
    tok.save_pretrained(tmp_path / "swa")
    write_manifest(tmp_path / "swa",
                   Manifest(name="swa", alpha=0.5, tokenizer_fingerprint=tokenizer_fingerprint(tok)))
    registry = MemoryRegistry(base)
    registry.load("swa", str(tmp_path / "swa"))
    engine = Engine(base, registry, EngineConfig(block_size=4, **engine_config))
    vocab = base.vocab_size
    texts = [("The patient was given a dose of the drug and", 0.5), ("The court", 1.0),
             ("The patient was given a dose of the drug and", 0.5)]
    reqs = [greedy(f"w{i}", prompt(base, text), n=12, memory="swa", alpha=a, logprobs=vocab)
            for i, (text, a) in enumerate(texts)]
    # w2 hits w0's cached blocks
    out = run(engine, reqs[:2], {4: reqs[2:]}, after_step=assert_pages_owned_once)
    specs = [(r.request_id, r.prompt_token_ids, "swa", r.mixture.terms[0].alpha, 12) for r in reqs]
    assert 0.0 < worst_error(out, specs, (base, registry)) <= 1e-4
    assert len(reqs[0].prompt_token_ids) > 8 and engine.runner.kv("swa").num_cached_blocks > 0


def test_memory_whose_kv_does_not_fit_a_page_is_refused_at_load(setup, tmp_path):
    """Prepared on load (as the server does): a memory with more KV bytes per token than a page holds is a
    clear load error, and the registry is unchanged."""
    from testkit.models import build_memory

    base, _ = setup
    registry = MemoryRegistry(base)
    engine = Engine(base, registry, EngineConfig(block_size=1))  # a page = one base token's KV (1 KiB)
    big = build_memory(tmp_path / "big", base.tokenizer, "big", "gpt2", hidden=64, layers=4)  # 2 KiB a token
    with pytest.raises(MemoryLoadError, match="more than a whole page"):
        registry.load("big", str(big), prepare=engine.prepare_memory)
    assert registry.list() == [] and "big" not in engine.runner.models
