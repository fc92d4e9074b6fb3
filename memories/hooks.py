"""Capture the datastore key: the hidden state entering the base model's last MLP block.

The key is read with a forward *pre*-hook on the MLP module itself, so the model's own `forward` runs
untouched and the captured tensor is exactly what the MLP sees (after the block's second norm).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# (path to the list of decoder blocks, name of the MLP child inside a block), per architecture family.
_KNOWN_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("transformer.h", "mlp"),  # GPT-2, GPT-J, Bloom-style
    ("model.layers", "mlp"),  # Llama, Qwen2/3, Mistral, Gemma, Phi-3
    ("gpt_neox.layers", "mlp"),  # GPT-NeoX, Pythia
    ("model.decoder.layers", "mlp"),
)
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff", "block_sparse_moe")


class HookResolutionError(RuntimeError):
    """No MLP module could be located in the model's last decoder block."""


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    found: object = module
    for part in dotted.split("."):
        found = getattr(found, part, None)
        if found is None:
            return None
    return found if isinstance(found, nn.Module) else None


def _block_list(model: nn.Module) -> nn.ModuleList | None:
    """The longest ModuleList in the model: in a decoder-only LM that is the stack of blocks."""
    best: nn.ModuleList | None = None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (best is None or len(mod) > len(best)):
            best = mod
    return best


def last_mlp(model: nn.Module) -> nn.Module:
    """The MLP module of the last decoder block, resolved per architecture with a generic fallback."""
    for blocks_path, mlp_name in _KNOWN_LAYOUTS:
        blocks = _get(model, blocks_path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            mlp = getattr(blocks[-1], mlp_name, None)
            if isinstance(mlp, nn.Module):
                return mlp
    blocks = _block_list(model)
    if blocks is not None:
        for name in _MLP_NAMES:
            mlp = getattr(blocks[-1], name, None)
            if isinstance(mlp, nn.Module):
                return mlp
    raise HookResolutionError(
        f"cannot find the last MLP block of {type(model).__name__}: expected a child named one of "
        f"{_MLP_NAMES} in the last decoder block"
    )


class KeyCapture:
    """Holds the most recent MLP input seen by the hook: [B, T, H]."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def take(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("the MLP hook did not fire: was the model run inside capture_mlp_input()?")
        value, self.value = self.value, None
        return value


@contextmanager
def capture_mlp_input(model: nn.Module) -> Iterator[KeyCapture]:
    """Within the block, every forward pass of `model` stores its last-MLP input in the yielded holder."""
    capture = KeyCapture()

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Some blocks call their MLP with a keyword argument; take the first tensor either way.
        tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
        if not tensors:
            raise HookResolutionError("the last MLP block was called without a tensor input")
        capture.value = tensors[0].detach()  # [B, T, H]

    handle = last_mlp(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield capture
    finally:
        handle.remove()
