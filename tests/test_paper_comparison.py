"""bench/paper_comparison.py's own pieces, on tiny random-init models and arrays made here (nothing
downloaded)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench import paper_comparison as pc

pytest.importorskip("faiss")


def tiny_llama(vocab: int = 61, seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg: dict[str, Any] = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               initializer_range=0.3)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def test_knn_lm_mixture_is_lambda_p_knn_plus_one_minus_lambda_p_base():
    rng = np.random.default_rng(0)
    q, k, n_entries, vocab = 50, 16, 200, 12
    dists = rng.uniform(0, 30, size=(q, k)).astype(np.float32)
    ids = rng.integers(0, n_entries, size=(q, k))
    ids[3, 5:] = -1  # missing neighbours take no mass
    dists[ids < 0] = np.inf
    values = rng.integers(0, vocab, size=n_entries)
    targets = rng.integers(0, vocab, size=q)
    base_lp = torch.log(torch.from_numpy(rng.uniform(0.01, 0.5, size=q))).float()
    for tau, lam in ((1.0, 0.25), (16.0, 0.05), (4.0, 0.5)):
        got = pc.knn_mix(base_lp, pc.knn_target_logprob(dists, ids, values, targets, tau), lam)
        for i in range(q):  # independently: softmax(−d/τ) over the valid neighbours, mass on the target's
            valid = ids[i] >= 0
            w = np.exp(-dists[i, valid].astype(np.float64) / tau)
            p_knn = (w * (values[ids[i, valid]] == targets[i])).sum() / w.sum()
            want = math.log(lam * p_knn + (1 - lam) * math.exp(float(base_lp[i])))
            assert float(got[i]) == pytest.approx(want, rel=1e-4, abs=1e-5), (i, tau, lam)
    # A target no neighbour holds gets only the base's share.
    lone = pc.knn_target_logprob(dists[:1], ids[:1], values, np.array([vocab + 5]), 1.0)
    assert float(pc.knn_mix(base_lp[:1], lone, 0.25)) == pytest.approx(float(base_lp[0]) + math.log(0.75),
                                                                       rel=1e-5)


def test_rag_scores_each_token_once_and_never_the_passage():
    model = tiny_llama()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 61, size=41)
    blocks = pc.rag_blocks(len(ids), every=8)
    covered = [t for b, e in blocks for t in range(b, e)]
    assert covered == list(range(1, len(ids)))  # every token after the first, once, in order
    retrieved = [rng.integers(0, 61, size=int(n)) for n in rng.integers(1, 6, size=len(blocks))]
    context = 16  # small, so most blocks keep only part of their left context
    got = pc.rag_logprobs(model, ids, blocks, retrieved, vocab=61, context=context)
    assert got.shape == (len(ids) - 1,)
    with torch.inference_mode():
        want = []
        for (b, e), passage in zip(blocks, retrieved, strict=True):
            s = max(0, b - (context - len(passage) - (e - b)))
            for t in range(b, e):  # one forward per scored token: passage + ids[s:t] predicts ids[t]
                inp = torch.as_tensor(np.concatenate([passage, ids[s:t]]), dtype=torch.long)[None]
                want.append(torch.log_softmax(model(input_ids=inp).logits[0, -1].float(), -1)[int(ids[t])])
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-5)
    # The passage is really read: other passages give other log-probs.
    other = pc.rag_logprobs(model, ids, blocks, [p[::-1] + 1 for p in retrieved], vocab=61, context=context)
    assert not torch.allclose(got, other)
    with pytest.raises(ValueError, match="no context"):
        pc.rag_logprobs(model, ids, blocks, [np.zeros(12, dtype=np.int64)] * len(blocks), vocab=61,
                        context=context)


def test_passages_cut_documents_never_join_them():
    eos = 0
    tokens = np.array([5, 6, 7, 0, 8, 0, 9, 9, 9, 9, 9, 0, 4, 4])
    chunks = pc.passages(tokens, eos, size=3)
    assert [c.tolist() for c in chunks] == [[5, 6, 7], [0], [8, 0], [9, 9, 9], [9, 9, 0], [4, 4]]
    assert np.concatenate(chunks).tolist() == tokens.tolist()


def test_lora_rank_matches_peft_and_the_memory_size():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    for rank in (1, 3, 8):
        wrapped = peft.get_peft_model(tiny_llama(),
                                      peft.LoraConfig(r=rank, target_modules=list(pc.LORA_TARGETS)))
        trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        assert pc.lora_parameters(model, rank) == trainable
    # The demo base's shape (SmolLM2-135M: 30 layers × 576, MLP 1536, 3 KV heads of 64): r = 46 is closest to
    # the memory's 14,189,824 parameters (46 × 305,280 = 14,042,880; 47 would give 14,348,160).
    with torch.device("meta"):
        smol = tiny_llama(vocab=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3)
    assert pc.lora_parameters(smol, 1) == 305_280
    assert pc.lora_rank_for(smol, 14_189_824) == 46


def test_base_pass_matches_the_protocol_and_the_datastore_keys():
    from memories.hooks import capture_mlp_input

    base, memory = tiny_llama(seed=2), tiny_llama(seed=3)
    ids = np.random.default_rng(4).integers(0, 61, size=120)
    out = pc.base_pass(base, memory, ids, vocab=61, mem_temperature=1.0)
    torch.testing.assert_close(out["base"], pc.slice_logprobs(base, ids, 61))
    torch.testing.assert_close(out["memory"], pc.slice_logprobs(memory, ids, 61))
    assert out["targets"].tolist() == ids[1:].tolist() and out["x"].shape == (119, 8)
    # one window: key of target t = hidden at t − 1
    with torch.inference_mode(), capture_mlp_input(base) as cap:
        base(input_ids=torch.as_tensor(ids)[None])
        hidden = cap.take()[0]
    torch.testing.assert_close(out["keys"].float(), hidden[:-1].to(torch.float16).float())


def test_train_ce_one_seeded_epoch_lowers_the_loss():
    tokens = np.tile(np.arange(10), 40)  # 400 tokens of a pattern a model can learn at once
    a = pc.train_ce(tiny_llama(vocab=12), tokens, seq_len=20, batch_size=4, lr=1e-2, seed=0)
    b = pc.train_ce(tiny_llama(vocab=12), tokens, seq_len=20, batch_size=4, lr=1e-2, seed=0)
    assert a["steps"] == 5 and a["tokens"] == 400
    assert a["losses"] == b["losses"]  # seeded
    assert a["loss_last"] < 0.5 * a["loss_first"]
