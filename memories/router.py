"""The learned per-token router: α_t from both models' next-token distributions at each position.

p_t = α_t·p_mem + (1 − α_t)·p_base with α_t = σ(f(x_t)), where x_t are a few summary statistics of the two
log-distributions at position t (entropies, top-1 log-probs, top-1 agreement, each model's log-prob of the
other's top token, KL(p_mem ‖ p_base)) and f is a tiny MLP (or a logistic regression with `hidden` = 0).

A router may also read *context features* (`RouterConfig.context_decays`): exponential moving averages of the
memory's advantage log p_mem(y_s) − log p_base(y_s) over the tokens y_s *before* position t (the prompt and
the tokens already emitted when serving), one per decay. They tell the router how the memory has been doing
on this text so far. `advantage_emas` is the one definition of that recurrence: the toolkit runs it over a
whole text, `/v1/perplexity` over each batch of windows, the engine over each prompt chunk and each new token,
carrying the state [rows, decays] in between. Routers without them (older files) read the 8 features alone.

This module is the ONE implementation of the router: the toolkit's fitting and evaluation
(`memories.router_fit`), the server's perplexity jobs and the engine's mixing path all call
`Router.log_weights` on log-distributions, so `"alpha": "auto"` serves exactly what the toolkit measured. The
features need only the two models' logits (no hidden states), so the engine computes them where it already
mixes, for the whole batch at once, with no extra forward output and no host sync.

On disk, inside the memory directory: `router.safetensors` (the tensors) and `router.json` (features, shape,
version, where it was fitted and how it did), recorded in the manifest's `router` entry.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memories.mixing import Part, apply

ROUTER_WEIGHTS = "router.safetensors"
ROUTER_CONFIG = "router.json"
ROUTER_VERSION = 1
# The features, in the order the router's first layer reads them. A router naming others is refused at load.
FEATURES = (
    "base_entropy",
    "memory_entropy",
    "base_max_logprob",
    "memory_max_logprob",
    "top1_agree",
    "memory_logprob_of_base_top",
    "base_logprob_of_memory_top",
    "kl_memory_base",
)
# The context features' decays that `memdec memory router` fits with unless told otherwise (`--no-context`).
DEFAULT_CONTEXT_DECAYS = (0.9, 0.99)
# Log-probs below this are zero probability for every feature; clamping keeps 0·(−inf) out of the sums.
_LOG_FLOOR = -1e4


class RouterError(ValueError):
    """A router file is missing, corrupt or of another version or shape."""


@dataclass(frozen=True)
class RouterConfig:
    """What `router.json` says about the tensors beside it (plus free-form provenance and numbers)."""

    features: tuple[str, ...] = FEATURES
    hidden: int = 16  # 0: logistic regression on the features
    version: int = ROUTER_VERSION
    fitted: dict[str, Any] = field(default_factory=dict)  # texts, memory, settings, selection numbers
    # one advantage EMA per decay, after FEATURES (none: an older router)
    context_decays: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "features": list(self.features), "context_decays": list(self.context_decays)}

    @staticmethod
    def with_context(decays: tuple[float, ...], **kw: Any) -> RouterConfig:
        """A config reading FEATURES and one advantage EMA per decay (in that order)."""
        return RouterConfig(features=feature_names(decays), context_decays=tuple(decays), **kw)


def feature_names(decays: tuple[float, ...]) -> tuple[str, ...]:
    return FEATURES + tuple(f"advantage_ema_{d}" for d in decays)


_SCAN_CHUNK = 128  # positions per step of the EMA scan: a [C, C] weight matrix per decay, then the carry


def advantage_emas(advantage: torch.Tensor, decays: tuple[float, ...], state: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The context features: e_k[i] = decay_k·e_k[i−1] + (1 − decay_k)·a[i−1], e_k[0] = state_k (0 when None).

    advantage: [..., N] log p_mem(y_i) − log p_base(y_i) at positions i (in text order); state: [..., K] the
    EMAs before position 0. Returns (the EMAs *before* each position [..., N, K] float32, the state after the
    last [..., K] float64). Computed in float64, in chunks (a [C, C] weighted sum each, no Python per
    position), so the toolkit (whole texts), the perplexity endpoint (batches of windows) and the engine
    (prompt chunks, one token per decode step) compute the same numbers however the text is cut."""
    a = advantage.double()
    lead, n = a.shape[:-1], a.shape[-1]
    # [K] filled on the device (torch.tensor(list, device=cuda) would copy from the host and wait for the
    # stream)
    d = torch.stack([torch.full((), k, dtype=torch.float64, device=a.device) for k in decays])
    s = (torch.zeros(*lead, len(decays), dtype=torch.float64, device=a.device) if state is None
         else state.double())
    outs = []
    for c0 in range(0, n, _SCAN_CHUNK):
        x = a[..., c0 : c0 + _SCAN_CHUNK]  # [..., C]
        c = x.shape[-1]
        i = torch.arange(c, device=a.device, dtype=torch.float64)
        lag = i[:, None] - 1 - i[None, :]  # [C, C] i − 1 − j
        # [K, C, C]
        w = torch.where(lag >= 0, (1 - d)[:, None, None] * d[:, None, None] ** lag.clamp_min(0), 0.0)
        before = d[:, None] ** i[None, :]  # [K, C] decay^i: the carried state's weight at position i
        e = torch.einsum("kij,...j->...ik", w, x) + s.unsqueeze(-2) * before.T  # [..., C, K]
        outs.append(e)
        # [C, K] each position's weight in the state after the chunk
        last = (1 - d) * d ** (c - 1 - i[:, None])
        s = s * d**c + torch.einsum("jk,...j->...k", last, x)
    e = torch.cat(outs, dim=-2) if outs else a.new_zeros(*lead, 0, len(decays))
    return e.float(), s


def features(base_logp: torch.Tensor, mem_logp: torch.Tensor,
             context: torch.Tensor | None = None) -> torch.Tensor:
    """[..., F] float32 features of two log-distributions [..., V] (float32, the same positions), followed by
    the context features `context` [..., K] when given (broadcast over trailing positions: [b, K] for
    [b, T, V])."""
    b, m = base_logp.float().clamp_min(_LOG_FLOOR), mem_logp.float().clamp_min(_LOG_FLOOR)
    pb, pm = b.exp(), m.exp()
    b_max, b_top = b.max(dim=-1)
    m_max, m_top = m.max(dim=-1)
    x = torch.stack(
        [
            -(pb * b).sum(-1),
            -(pm * m).sum(-1),
            b_max,
            m_max,
            (b_top == m_top).float(),
            m.gather(-1, b_top.unsqueeze(-1)).squeeze(-1),
            b.gather(-1, m_top.unsqueeze(-1)).squeeze(-1),
            (pm * (m - b)).sum(-1),
        ],
        dim=-1,
    )
    if context is None:
        return x
    while context.dim() < x.dim():  # [b, K] for positions [b, T]: the same state at every position of a row
        context = context.unsqueeze(-2)
    return torch.cat([x, context.float().expand(*x.shape[:-1], context.shape[-1])], dim=-1)


class Router(nn.Module):
    """α_t = σ(net((x − mean) / std)); `log_weights` gives (log α_t, log(1 − α_t)) exactly, via
    log-sigmoid."""

    mean: torch.Tensor  # [F] feature standardisation, fitted with the router
    std: torch.Tensor  # [F]

    def __init__(self, config: RouterConfig = RouterConfig()) -> None:
        super().__init__()
        self.config = config
        n = len(config.features)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))
        if config.hidden:
            self.net: nn.Module = nn.Sequential(nn.Linear(n, config.hidden), nn.Tanh(),
                                                nn.Linear(config.hidden, 1))
        else:
            self.net = nn.Linear(n, 1)

    @property
    def context_decays(self) -> tuple[float, ...]:
        return self.config.context_decays

    def start_at(self, alpha: float) -> None:
        """Output `alpha` everywhere (last layer's weights 0, bias logit(α)): fitting starts from the fixed
        α."""
        last = self.net[-1] if isinstance(self.net, nn.Sequential) else self.net
        assert isinstance(last, nn.Linear)
        a = min(max(alpha, 1e-3), 1 - 1e-3)
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(float(torch.logit(torch.tensor(a))))

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """[...] router logits of features [..., F]."""
        return self.net((x - self.mean) / self.std).squeeze(-1)

    def log_weights(self, base_logp: torch.Tensor, mem_logp: torch.Tensor, context: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log α_t, log(1 − α_t)), each [...], for log-distributions [..., V] and, for a router with context
        features, their EMAs before each position [..., K] (`advantage_emas`)."""
        if (context is None) != (not self.config.context_decays):
            raise ValueError(f"this router reads {len(self.config.context_decays)} context features; got "
                             f"{'none' if context is None else context.shape[-1]}")
        z = self.logit(features(base_logp, mem_logp, context))
        return nn.functional.logsigmoid(z), nn.functional.logsigmoid(-z)

    def mixed_targets(
        self, base_logp: torch.Tensor, mem_logp: torch.Tensor, targets: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(base, memory, mixture log-probs of `targets` [...], α_t [...]) from log-distributions [..., V]."""
        log_a, log_1ma = self.log_weights(base_logp, mem_logp, context)
        base_t = base_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mem_t = mem_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return base_t, mem_t, apply(base_t, [Part(mem_t, log_a, log_1ma)]), log_a.exp()


def routed_part(router: Router, base_logp: torch.Tensor, mem_logp: torch.Tensor,
                context: torch.Tensor | None = None, routed: torch.Tensor | None = None,
                fixed_log_alpha: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> Part:
    """The memory's `Part` of a mixture with the router's α_t at every position, from both models' log-
    distributions [..., V] (the base's own, not the mixture so far: the router reads the two models). `routed`
    [..., 1] (bool) picks the rows that use the router, the others keep `fixed_log_alpha` [..., 1] and a base
    that `apply` weighted already, so one part serves a whole memory group of the engine. `context`: the rows'
    context features (`Router.log_weights`), for a router that reads them; `rows`: the batch rows
    (`Part.rows`)."""
    log_a, log_1ma = (t.unsqueeze(-1) for t in router.log_weights(base_logp, mem_logp, context))  # [..., 1]
    if routed is not None:
        assert fixed_log_alpha is not None
        log_a = torch.where(routed, log_a, fixed_log_alpha)
        log_1ma = torch.where(routed, log_1ma, torch.zeros_like(log_1ma))  # fixed rows: base already weighted
    return Part(mem_logp, log_a, log_1ma, rows)


def mixture_nll(z: torch.Tensor, base_t: torch.Tensor, mem_t: torch.Tensor) -> torch.Tensor:
    """Mean −log(σ(z)·p_mem(y) + σ(−z)·p_base(y)) from router logits and the targets' log-probs: the
    objective."""
    ls = nn.functional.logsigmoid
    return -apply(base_t, [Part(mem_t, ls(z), ls(-z))]).mean()


# ---------------------------------------------------------------- files


def save_router(router: Router, directory: str | Path) -> dict[str, Any]:
    """Write router.safetensors and router.json into `directory`; returns the manifest's `router` entry."""
    from safetensors.torch import save_file

    from memories.jsonfile import write_json

    directory = Path(directory)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in router.state_dict().items()}
    tmp = directory / (ROUTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(directory / ROUTER_WEIGHTS)
    write_json(directory / ROUTER_CONFIG, router.config.to_dict())
    return {"weights": ROUTER_WEIGHTS, "config": ROUTER_CONFIG, "features": list(router.config.features),
            "hidden": router.config.hidden, "version": router.config.version,
            "context_decays": list(router.config.context_decays)}


def load_router(directory: str | Path, entry: dict[str, Any] | None = None,
                device: torch.device | str = "cpu") -> Router:
    """The router a manifest's `router` entry names (default file names when None), on `device`, in eval mode;
    RouterError naming the file when it is missing, unreadable, of another version, or its tensors do not
    fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    entry = entry or {}
    config_path = directory / str(entry.get("config", ROUTER_CONFIG))
    weights_path = directory / str(entry.get("weights", ROUTER_WEIGHTS))
    for path in (config_path, weights_path):
        if not path.is_file():
            raise RouterError(f"the manifest names a router but {path} is missing")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        decays = tuple(float(d) for d in data.get("context_decays", ()))  # absent in older routers: none
        config = RouterConfig(features=tuple(data["features"]), hidden=int(data["hidden"]),
                              version=int(data["version"]), fitted=dict(data.get("fitted", {})),
                              context_decays=decays)
    except (ValueError, KeyError, TypeError) as exc:
        raise RouterError(f"{config_path} is not a router config: {exc}") from None
    if config.version != ROUTER_VERSION:
        raise RouterError(f"{config_path}: router version {config.version}, this server reads "
                          f"{ROUTER_VERSION}")
    if not all(0.0 < d < 1.0 for d in config.context_decays):
        raise RouterError(f"{config_path}: context decays must lie in (0, 1)")
    if config.features != feature_names(config.context_decays):
        raise RouterError(f"{config_path}: features {list(config.features)} are not this server's "
                          f"{list(feature_names(config.context_decays))}")
    if config.hidden < 0:
        raise RouterError(f"{config_path}: hidden must be >= 0")
    router = Router(config)
    try:
        tensors = load_file(str(weights_path))
        router.load_state_dict(tensors, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise RouterError(
            f"{weights_path} does not hold this router's tensors: {str(exc).splitlines()[0]}"
        ) from None
    if not all(torch.isfinite(t).all() for t in router.state_dict().values()):
        raise RouterError(f"{weights_path} holds non-finite values")
    return router.to(device).eval().requires_grad_(False)
