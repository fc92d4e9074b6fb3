"""Weight-only quantization (`--quantization`, memories/quantize.py): each layer against an independent
reference built from the grid it should hold, and the engine's specifications re-run on quantized models with
their references computed from the *same* quantized weights (full no-cache forwards + the formula, HF
generate)."""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from memories.quantize import (
    Int4Linear,
    Int8Linear,
    QuantizationError,
    auto_scheme,
    check_scheme,
    quantize_model,
)
from server.config import ModelConfig, ServerConfig
from server.loader import ModelLoadError, load_base, load_causal_lm, load_tokenizer
from server.registry import MemoryRegistry
from tests.api_harness import InProcessServer
from tests.engine_helpers import assert_clean, engine_for, greedy, prompt, run, tokens_of, worst_error


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _on_a_4bit_grid(
    out_f: int, in_f: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, q, scale, low): weights as a Q4_1 GGUF dequantizes them, every group using codes 0 and 15."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_f, in_f // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15  # the quantizer puts a group's min at 0 and its max at 15
    scale = torch.rand(out_f, in_f // 32, 1, generator=g) * 0.01 + 1e-3
    low = torch.randn(out_f, in_f // 32, 1, generator=g) * 0.05
    return (q * scale + low).reshape(out_f, in_f), q, scale, low


@pytest.mark.parametrize("bias", [False, True])
def test_int4_layer_recovers_a_4bit_grid_and_multiplies_as_its_reference(bias):
    weight, q, scale, low = _on_a_4bit_grid(48, 96)
    b = torch.randn(48) if bias else None
    layer = Int4Linear(weight, b)
    # The reference: the same codes with scale and zero stored in bfloat16 (the kernel's only rounding of the
    # weights), bfloat16 activations, products summed in float.
    zero = _bf16(low + 8 * scale)
    w_ref = ((q - 8) * _bf16(scale) + zero).reshape(48, 96)
    x = torch.randn(2, 5, 96)
    expected = _bf16(x) @ w_ref.t() + (b if bias else 0)
    got = layer(x)
    assert got.shape == (2, 5, 48) and got.dtype == torch.float32
    # bfloat16 output: 8 bits of mantissa.
    assert (got - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()
    assert (layer.weight - w_ref).abs().max().item() <= 1e-2 * w_ref.abs().max().item()
    # Off the grid: every weight within half a step (plus the bfloat16 rounding) of the original.
    rough = torch.randn(48, 96) * 0.05
    off = Int4Linear(rough, None).weight
    step = (rough.reshape(48, 3, 32).amax(-1) - rough.reshape(48, 3, 32).amin(-1)) / 15
    err = (off - rough).abs().reshape(48, 3, 32)
    assert (err <= step[..., None] * 0.5 + 2e-3).all()


@pytest.mark.parametrize("conv1d", [False, True])
def test_int8_layer_multiplies_as_its_per_row_reference(conv1d):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 24)
    if conv1d:  # GPT-2's layers store [in, out]
        module: torch.nn.Module = Conv1D(24, 48)
        module.weight.data.copy_(linear.weight.data.t())
        module.bias.data.copy_(linear.bias.data)
    else:
        module = linear
    odd = torch.nn.Linear(40, 8)  # an input width the int8 kernel cannot take stays as it is
    wrapper = torch.nn.Sequential(module, odd)
    summary = quantize_model(wrapper, "int8")
    layer = wrapper[0]
    assert isinstance(layer, Int8Linear) and wrapper[1] is odd
    assert (summary.int8_layers, summary.float_layers) == (1, 1)
    w = linear.weight.detach()
    s = w.abs().amax(1) / 127
    w_ref = torch.round(w / s[:, None]) * _bf16(s)[:, None]
    x = torch.randn(7, 48)
    expected = _bf16(x) @ w_ref.t() + linear.bias.detach()
    assert (layer(x) - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()


def test_schemes_and_their_refusals():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [auto_scheme(cpu, t) for t in ("Q4_1", "Q4_0", "Q8_0", "F16", None)] == [
        "int4",
        "int4",
        "int8",
        "none",
        "none",
    ]
    assert auto_scheme(gpu, "Q4_1") == "none"  # the GPU path keeps its dtype
    with pytest.raises(QuantizationError, match="CPU kernels"):
        check_scheme("int4", gpu)
    with pytest.raises(QuantizationError, match="unknown quantization"):
        check_scheme("fp3", cpu)
    with pytest.raises(ValueError, match="quantization must be one of"):
        ModelConfig("x", quantization="int2")


# -- the engine on quantized models ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qsetup(zoo):
    """The engine tests' base and memories, loaded with --quantization int4 (layers the int4 kernel cannot
    take, like the 48-wide Llama memory's, hold int8)."""
    base = load_base(ModelConfig(str(zoo.base), quantization="int4"))
    registry = MemoryRegistry(base)
    registry.load("med", str(zoo.mem_llama))
    registry.load("law", str(zoo.mem_qwen_padded))
    registry.load("fin", str(zoo.mem_gpt2))
    return base, registry


def _kinds(model: torch.nn.Module) -> set[str]:
    return {
        type(m).__name__
        for m in model.modules()
        if isinstance(m, Int4Linear | Int8Linear | torch.nn.Linear | Conv1D)
    }


def test_quantized_models_really_hold_quantized_layers(qsetup):
    base, registry = qsetup
    assert base.serving_quantization == "int4"
    assert _kinds(base.model) == {"Int4Linear", "Int8Linear"}  # blocks int4, the output layer int8
    med = registry.loaded("med").model  # Llama, hidden 48: inputs of 48 take no int4 group, of 96 do
    assert isinstance(med.model.layers[0].self_attn.q_proj, Int8Linear)
    assert isinstance(med.model.layers[0].mlp.down_proj, Int4Linear)
    assert "Int4Linear" in _kinds(registry.loaded("law").model)
    assert registry.loaded("fin").serving_quantization == "int4"  # memories follow the base's scheme


def test_quantized_mixture_matches_full_forwards_of_the_same_quantized_models(qsetup):
    """The churn specification on quantized weights: every step's mixed distribution equals the formula
    applied to full no-cache forwards of the same quantized base and memories."""
    base, _ = qsetup
    vocab = base.vocab_size
    specs = [  # rid, text, memory, alpha, tokens, joins before step
        ("a", "The patient was given a dose", "med", 0.6, 7, 0),
        ("b", "The court held", "law", 0.3, 3, 0),
        ("c", "Once upon a time there was", None, 0.0, 5, 0),
        ("d", "inflation", "fin", 0.9, 4, 2),
        ("e", "The statute applies to", "med", 1.0, 3, 3),
    ]
    reqs = {
        rid: greedy(rid, prompt(base, t), n=n, memory=m, alpha=a, logprobs=vocab)
        for rid, t, m, a, n, _ in specs
    }
    join: dict[int, list] = {}
    for rid, *_, at in specs:
        if at:
            join.setdefault(at, []).append(reqs[rid])
    engine = engine_for(qsetup, block_size=2)
    out = run(engine, [reqs[rid] for rid, *_, at in specs if at == 0], join)
    worst = worst_error(
        out, [(rid, reqs[rid].prompt_token_ids, m, a, n) for rid, _, m, a, n, _ in specs], qsetup
    )
    assert 0.0 < worst <= 1e-4, worst
    assert_clean(engine)


def test_quantized_base_greedy_equals_generate_of_the_same_model(qsetup):
    base, _ = qsetup
    ids = prompt(base, "The committee expects inflation")
    ref = base.model.generate(
        torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    out = run(engine_for(qsetup, block_size=4), [greedy("r", ids, n=24)])
    assert tokens_of(out["r"]) == ref[0, len(ids) :].tolist()


def test_quantization_is_refused_with_tensor_parallelism_and_on_a_gpu(zoo):
    """Both refusals come before any weight is read (so neither needs a GPU or torch.distributed here)."""
    tok = load_tokenizer(str(zoo.base))
    with pytest.raises(ModelLoadError, match="CPU kernels"):
        load_causal_lm(str(zoo.base), torch.device("cuda"), torch.bfloat16, tok, quantization="int8")
    with pytest.raises(ModelLoadError, match="tensor parallelism"):
        load_causal_lm(
            str(zoo.base), torch.device("cpu"), torch.float32, tok, sharded=True, quantization="int4"
        )


def test_model_cards_say_what_runs(zoo):
    config = ServerConfig(model=ModelConfig(str(zoo.base), quantization="int8"))
    with InProcessServer(config) as s:
        r = s.get("/v1/models")
    assert isinstance(r, httpx.Response) and r.status_code == 200
    (card,) = r.json()["data"]
    assert card["serving_quantization"] == "int8" and card["format"] == "safetensors"


def test_a_model_no_kernel_can_take_serves_as_loaded():
    """A memory whose every input width misses the kernels' multiples is not an error: nothing is swapped."""
    model = torch.nn.Sequential(torch.nn.Linear(40, 8), torch.nn.Linear(8, 24))
    summary = quantize_model(model, "int4")
    assert not summary.quantized and summary.float_layers == 2
    assert all(type(m) is torch.nn.Linear for m in model)
