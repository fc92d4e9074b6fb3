"""Host <-> device copies that never make the host wait, except the one wait per step that reads results.

On CUDA, `torch.tensor(list, device=...)` or a copy from pageable memory blocks the host until the
device has caught up, which serialises the host's launches with the device's work. Uploads here go
through pinned staging buffers with `non_blocking=True`; results come back through pinned buffers and
one event wait. On CPU the same calls are plain copies.
"""

from __future__ import annotations

import numpy as np
import torch


class Uploader:
    """numpy arrays -> device tensors, asynchronously.

    A staging region is handed out once per step: `reset()` (called by the engine after the step's
    host sync, when every copy out of staging has completed) makes the buffers reusable.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: dict[np.dtype, torch.Tensor] = {}
        self._used: dict[np.dtype, int] = {}
        self._retired: list[torch.Tensor] = []  # outgrown buffers copies may still read from, until reset()

    def _staging(self, arr: np.ndarray) -> torch.Tensor:
        dtype, n = arr.dtype, arr.size
        buf = self._buffers.get(dtype)
        used = self._used.get(dtype, 0)
        if buf is None or used + n > buf.numel():
            if buf is not None:
                self._retired.append(buf)
            torch_dtype = torch.from_numpy(arr[:0].reshape(-1)).dtype
            buf = torch.empty(max(2 * (used + n), 1 << 14), dtype=torch_dtype, pin_memory=True)
            self._buffers[dtype] = buf
            used = 0
        view = buf[used : used + n]
        view.copy_(torch.from_numpy(arr.reshape(-1)))
        self._used[dtype] = used + n
        return view.view(arr.shape)

    def __call__(self, arr: np.ndarray) -> torch.Tensor:
        arr = np.ascontiguousarray(arr)
        if not self.pinned:
            return torch.from_numpy(arr.copy()).to(self.device)
        return self._staging(arr).to(self.device, non_blocking=True)

    def reset(self) -> None:
        self._used.clear()
        self._retired.clear()


def fetch(*tensors: torch.Tensor) -> list[np.ndarray]:
    """The step's one host synchronisation: copy device results to the host and wait for them.

    Everything the host reads from a step goes through one call, so a step waits once however many
    results it reads (sampled tokens, their log-probs, top alternatives).
    """
    if not tensors:
        return []
    if tensors[0].device.type != "cuda":
        return [t.detach().numpy() for t in tensors]
    hosts = []
    for t in tensors:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        hosts.append(host)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return [h.numpy() for h in hosts]
