"""Weight-only quantization for serving on a CPU (`memdec serve --quantization`, vLLM's flag).

A decode step on a CPU is bound by reading the weights: SmolLM2-135M in float32 is 540 MB per token. Storing
the linear layers' weights in 4 or 8 bits and running PyTorch's own weight-only kernels (no hand-written
kernels) reads a quarter or an eighth of that. What runs, per scheme:

- ``int4``: every linear layer whose shape the kernel takes (output rows a multiple of 16, input a multiple of
  32) holds 4-bit weights in groups of 32 inputs, each group with its own scale and offset
  (``torch._weight_int4pack_mm_for_cpu``); the LM head holds int8 (below), because a GGUF's embedding is
  stored at 8 bits (Q8_0) and 4 bits there costs the base 7% perplexity. Layers the kernel cannot take hold
  int8.
- ``int8``: every linear layer holds int8 weights with one scale per output row
  (``torch._weight_int8pack_mm``). A layer whose input width is not a multiple of 16 (the kernel's
  constraint) stays in the model's dtype; the summary counts it.

Both kernels multiply bfloat16 activations (their float32 paths are 10–30× slower on the CPUs measured); the
result is cast back to the model's dtype, so everything outside the linear layers (norms, attention, softmax,
the mixture) runs exactly as without quantization.

Invariants the engine and its tests rely on:
- A quantized model is an ordinary ``nn.Module``: the engine, HF ``generate`` and a plain forward all run the
  *same* quantized layers, so every reference a test computes from full forwards uses the same weights.
- Weights already on a 4-bit grid of 32-input groups (a Q4_0 / Q4_1 GGUF, dequantized at load) are
  re-quantized without rounding: each group's min and max recover its grid exactly; only the bfloat16 storage
  of its scale and offset rounds (≈ 0.2% of a weight on average).
- ``weight`` on a quantized layer runs its kernel on the identity at every access: for shape checks, never
  on a hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

__all__ = [
    "SCHEMES",
    "Int4Linear",
    "Int8Linear",
    "QuantizationError",
    "QuantizedSummary",
    "auto_scheme",
    "check_scheme",
    "quantize_model",
]

SCHEMES = ("auto", "none", "int8", "int4")
GROUP = 32  # inputs per int4 group: a GGUF block (Q4_0/Q4_1/Q8_0 are blocks of 32)


class QuantizationError(ValueError):
    """A quantization scheme this model or device cannot run."""


def _as_linear_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in] as float32, bias) of an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's: [in,
    out])."""
    if isinstance(module, Conv1D):
        return module.weight.detach().t().contiguous().float(), module.bias
    assert isinstance(module, torch.nn.Linear)
    return module.weight.detach().float(), module.bias


class _QuantizedLinear(torch.nn.Module):
    """Shared by both schemes: flattening to 2-D, the bfloat16 round trip, the bias."""

    qweight: torch.Tensor  # the kernel's weights: int8 [out, in], or int4's packed nibbles

    in_features: int
    out_features: int
    bias: torch.nn.Parameter | None

    def _mm(self, x: torch.Tensor) -> torch.Tensor:  # [M, in] bfloat16 -> [M, out]
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._mm(x.reshape(-1, shape[-1]).to(torch.bfloat16)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:  # [out, in] float32
        # The kernel applied to the identity: the weights exactly as it computes with them (bfloat16
        # products).
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.qweight.device)
        return self._mm(eye).float().t()

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized()


class Int8Linear(_QuantizedLinear):
    """int8 weights, one float scale per output row: w ≈ q · s (symmetric, |q| ≤ 127)."""

    scale: torch.Tensor  # [out] bfloat16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        scale = weight.abs().amax(1).clamp(min=1e-12) / 127  # [out]
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    @staticmethod
    def fits(out_features: int, in_features: int) -> bool:
        return in_features % 16 == 0  # the CPU kernel's constraint (other widths crash it, not raise)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.qweight, self.scale)


class Int4Linear(_QuantizedLinear):
    """4-bit weights in groups of 32 inputs: w ≈ (q − 8) · scale + zero per group, q ∈ [0, 15] (asymmetric:
    the group's min and max span the grid, as Q4_1 does)."""

    scales_and_zeros: torch.Tensor  # [in/32, out, 2] bfloat16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        groups = weight.reshape(self.out_features, -1, GROUP)  # [out, in/32, 32]
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        # The kernel's layout: packed nibbles, and [in/32, out, 2] (scale, zero), zero = the value q = 8
        # takes.
        packed = torch._convert_weight_to_int4pack_for_cpu(q.reshape(self.out_features, -1), 1)
        self.register_buffer("qweight", packed)
        zeros = low + 8 * scale
        sz = torch.stack([scale, zeros], -1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    @staticmethod
    def fits(out_features: int, in_features: int) -> bool:
        return out_features % 16 == 0 and in_features % GROUP == 0  # the CPU kernel's constraints

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.qweight, GROUP, self.scales_and_zeros)


@dataclass(frozen=True)
class QuantizedSummary:
    """What runs after `quantize_model`: the scheme and how many linear layers hold each format."""

    scheme: str  # "int8" or "int4"
    int4_layers: int
    int8_layers: int
    float_layers: int  # shapes neither kernel takes
    weight_bytes: int  # bytes the quantized layers' kernels read per token (weights + scales)

    @property
    def quantized(self) -> bool:
        return self.int4_layers + self.int8_layers > 0

    def describe(self) -> str:
        kinds = ((self.int4_layers, "int4"), (self.int8_layers, "int8"), (self.float_layers, "unquantized"))
        parts = [f"{n} {kind}" for n, kind in kinds if n]
        mb = self.weight_bytes / 1e6
        return (f"{self.scheme} weight-only, bfloat16 activations ({', '.join(parts)} linear layers; "
                f"{mb:.1f} MB read)")


def auto_scheme(device: torch.device, gguf_type: str | None) -> str:
    """The default (``--quantization auto``): on a CPU, a GGUF base runs in the precision its file was stored
    in — 4-bit files (Q4_*) as int4, 8-bit (Q8_0) as int8 — because its user chose a quantized model: 4-bit
    blocks re-quantize onto their own grid, 8-bit blocks into per-row int8 (a rounding the perplexity checks
    in docs/performance.md measure); everything else (safetensors, F16/F32 files, any GPU) runs
    unquantized."""
    if device.type != "cpu" or gguf_type is None:
        return "none"
    if gguf_type.upper().startswith("Q4"):
        return "int4"
    if gguf_type.upper().startswith("Q8"):
        return "int8"
    return "none"


def check_scheme(scheme: str, device: torch.device) -> None:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme in ("int8", "int4") and device.type != "cpu":
        raise QuantizationError(
            f"--quantization {scheme} runs PyTorch's CPU kernels; on {device.type} the weights stay in the "
            "serving dtype (use --quantization none or auto)"
        )


def quantize_model(model: torch.nn.Module, scheme: str) -> QuantizedSummary:
    """Replace `model`'s linear layers in place with `scheme`'s (module docstring). The output layer (tied to
    the input embedding or not) gets an int8 copy; the input embedding stays as loaded (a lookup reads one
    row)."""
    if scheme not in ("int8", "int4"):
        raise QuantizationError(f"quantize_model takes int8 or int4, not {scheme!r}")
    output_layer = getattr(model, "get_output_embeddings", None)
    head = output_layer() if callable(output_layer) else None
    counts = {"int4": 0, "int8": 0, "float": 0}
    nbytes = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear | Conv1D):
                continue
            weight, bias = _as_linear_weight(child)
            out_f, in_f = weight.shape
            q: _QuantizedLinear
            if scheme == "int4" and child is not head and Int4Linear.fits(out_f, in_f):
                q, kind = Int4Linear(weight, bias), "int4"
                nbytes += out_f * in_f // 2 + 4 * out_f * in_f // GROUP
            elif Int8Linear.fits(out_f, in_f):
                q, kind = Int8Linear(weight, bias), "int8"
                nbytes += out_f * in_f + 2 * out_f
            else:
                counts["float"] += 1
                continue
            setattr(parent, name, q.to(weight.device))
            counts[kind] += 1
    return QuantizedSummary(scheme, counts["int4"], counts["int8"], counts["float"], nbytes)
