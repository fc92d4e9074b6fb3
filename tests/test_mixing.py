"""The mixture formula and the sliding-window scorer with stub models (in the style of nanochat's engine
tests): exact references, no model files."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from memories.mixing import mix_logprobs, mix_scalar
from memories.perplexity import (
    Window,
    WindowSettingsError,
    document_logprobs,
    sliding_windows,
    window_batches,
    window_settings,
)

# -- the mixture and the window scorer, with stub models ----------------------------------------------------


class _BigramLM(torch.nn.Module):
    """A stub causal LM whose next-token logits depend on the current token only: exact references."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__()
        table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 3
        self.table = torch.nn.Parameter(table, requires_grad=False)  # [V, V]

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0) -> SimpleNamespace:
        logits = self.table[input_ids]  # [B, T, V]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def _bigram_reference(model: _BigramLM, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[t-1]) for t = 1..N-1, float64."""
    logp = torch.log_softmax(model.table.double(), -1)
    return logp[ids[:-1], ids[1:]]


@pytest.mark.parametrize(("context", "stride", "max_tokens"),
                         [(8, 4, 64), (8, 7, 8), (5, 1, 20), (64, 32, 128)])
def test_window_scorer_scores_every_token_once_in_order(context, stride, max_tokens):
    base, mem = _BigramLM(11, 0), _BigramLM(11, 1)
    ids = torch.randint(0, 11, (37,), generator=torch.Generator().manual_seed(2))
    batches = list(document_logprobs([base, mem], ids, context, stride, 11, max_tokens=max_tokens))
    got_base = torch.cat([b for b, _ in batches]).double()
    got_mem = torch.cat([m for _, m in batches]).double()
    torch.testing.assert_close(got_base, _bigram_reference(base, ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(got_mem, _bigram_reference(mem, ids), rtol=0, atol=1e-5)
    assert len(batches) >= math.ceil(len(ids) / max(max_tokens, context))


def test_mixture_is_alpha_weighted_probability_with_exact_ends():
    base, mem = _BigramLM(13, 3), _BigramLM(13, 4)
    b = torch.log_softmax(base.table[5], -1)  # [V]
    m = torch.log_softmax(mem.table[5], -1)
    for alpha in (0.0, 0.3, 0.75, 1.0):
        mixed = mix_logprobs(b, m, alpha)
        expected = (alpha * m.double().exp() + (1 - alpha) * b.double().exp()).log()
        torch.testing.assert_close(mixed.double(), expected, rtol=0, atol=1e-5)
        assert abs(torch.logsumexp(mixed.double(), -1).item()) < 1e-5  # still a distribution
        assert mix_scalar(b[2].item(), m[2].item(), alpha) == pytest.approx(mixed[2].item(), abs=1e-5)
    assert torch.equal(mix_logprobs(b, m, 0.0), b) and torch.equal(mix_logprobs(b, m, 1.0), m)
    rows = mix_logprobs(torch.stack([b, b]), torch.stack([m, m]), torch.tensor([0.0, 1.0]))  # one α per row
    assert torch.equal(rows[0], b) and torch.equal(rows[1], m)


def test_window_batches_never_mix_shapes_and_respect_every_bound():
    windows = list(sliding_windows(100, 16, 4))
    for bounds in ({"max_tokens": 40}, {"max_logits": 40, "vocab_size": 5}, {"max_windows": 3}, {}):
        batches = list(window_batches(windows, **bounds))
        assert [w for b in batches for w in b] == windows
        for b in batches:
            assert len({(w.end - w.begin, w.num_scored) for w in b}) == 1
            assert len(b) * (b[0].end - b[0].begin) <= bounds.get("max_tokens", 10**9) or len(b) == 1
            assert (len(b) * b[0].num_scored * bounds.get("vocab_size", 1)
                    <= bounds.get("max_logits", 10**9) or len(b) == 1)
            assert len(b) <= bounds.get("max_windows", 10**9)
    assert windows[0] == Window(0, 16, 1)


def test_window_settings_defaults_and_refusals():
    assert window_settings(4096) == (1024, 512)
    assert window_settings(300) == (300, 150)
    assert window_settings(300, 64, 10) == (64, 10)
    assert window_settings(300, 5000, clamp=True) == (300, 150)
    with pytest.raises(WindowSettingsError) as too_long:
        window_settings(300, 5000)
    assert too_long.value.param == "context_length"
    with pytest.raises(WindowSettingsError) as bad_stride:
        window_settings(300, 64, 65)
    assert bad_stride.value.param == "stride"
