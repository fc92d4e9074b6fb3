"""The shipped demo (demo/): the files, the server loading them, each memory lowering perplexity on
its own domain's held-out text with both bases, and zero-flag `memdec serve` resolving to it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from server import cli
from server.config import PLAIN_CHAT_TEMPLATE, ModelConfig, default_served_name
from server.loader import LoadedModel, load_base
from server.registry import MemoryRegistry

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MEMORIES = {"biomed": "biomedical", "legal": "legal", "finance": "finance"}
NUM_TOKENS = 400

pytestmark = pytest.mark.skipif(not (DEMO / "base" / "config.json").is_file(), reason="no demo/ models")


def _model_dirs() -> list[Path]:
    return [DEMO / "base", DEMO / "base-small", *(DEMO / "memories" / n for n in MEMORIES)]


def test_shipped_files_are_small_half_precision_safetensors():
    total = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert total <= 60 * 2**20, f"demo/ holds {total / 2**20:.1f} MiB"  # the demo's size budget
    for d in _model_dirs():
        weights = d / "model.safetensors"
        assert weights.stat().st_mode & 0o044 == 0o044, f"{weights} is not world-readable"
        with safe_open(str(weights), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        assert dtypes <= {"F16", "BF16"}, (d, dtypes)
        assert not list(d.glob("*.bin")) and not list(d.glob("*.pt"))
    for name, domain in MEMORIES.items():
        manifest = json.loads((DEMO / "memories" / name / "memdec.json").read_text())
        assert manifest["name"] == name and manifest["domain"] == domain and 0 < manifest["alpha"] < 1


def _domain_ids(tokenizer, domain: str) -> torch.Tensor:
    text = "\n".join((DATA / domain / "valid.txt").read_text(encoding="utf-8").splitlines()[:40])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:NUM_TOKENS]
    assert len(ids) == NUM_TOKENS
    return torch.tensor([ids])  # [1, T]


@torch.inference_mode()
def _target_logprobs(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t ≥ 1 over the first len(tokenizer) logits: [T-1]."""
    logits = loaded.model(input_ids=ids).logits[0, :-1, : loaded.vocab_size].float()  # [T-1, V]
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)  # [T-1]


def _ppl(logprobs: torch.Tensor) -> float:
    return math.exp(-logprobs.double().mean().item())


@pytest.fixture(scope="module")
def bases() -> dict[str, tuple[LoadedModel, MemoryRegistry]]:
    out = {}
    for base in ("base", "base-small"):
        loaded = load_base(ModelConfig(model=str(DEMO / base), dtype="float32", device="cpu"))
        registry = MemoryRegistry(loaded)  # the server's own checks: manifest, tokenizer fingerprint
        for name in MEMORIES:
            registry.load(name, DEMO / "memories" / name)
        out[base] = (loaded, registry)
    return out


@pytest.mark.skipif(not DATA.is_dir(), reason="no ../shared/data")
@pytest.mark.parametrize("base", ["base", "base-small"])
@pytest.mark.parametrize("name", list(MEMORIES))
def test_memory_lowers_perplexity_on_its_domain(bases, base, name):
    loaded, registry = bases[base]
    memory = registry.acquire(name)
    try:
        alpha = registry.get(name).alpha
        ids = _domain_ids(loaded.tokenizer, MEMORIES[name])
        b, m = _target_logprobs(loaded, ids), _target_logprobs(memory, ids)
        mixed = torch.logaddexp(math.log(alpha) + m, math.log(1 - alpha) + b)  # log(α·p_mem + (1−α)·p_base)
    finally:
        registry.release(name)
    base_ppl, mixed_ppl = _ppl(b), _ppl(mixed)
    # In-source text (valid.txt's first source is in every memory's datastore): docs/demo.md's in-source table
    # shows -27% to -86% on 10,000 tokens per source; a few hundred tokens are noisier, so ask for -20%.
    assert mixed_ppl < 0.8 * base_ppl, f"{base}+{name}: base {base_ppl:.1f}, mixture {mixed_ppl:.1f}"


@pytest.mark.skipif(not DATA.is_dir(), reason="no ../shared/data")
@pytest.mark.parametrize("domain", ["biomedical", "legal", "finance"])
def test_each_domain_is_served_best_by_its_own_memory(bases, domain):
    """Memories are specialists: on a domain's text, its own memory at its α gives a lower perplexity than
    either other memory at theirs (what the memory lens and `memory: auto` rely on to tell them apart)."""
    loaded, registry = bases["base"]
    ids = _domain_ids(loaded.tokenizer, domain)
    b = _target_logprobs(loaded, ids)
    mixed = {}
    for name in MEMORIES:
        memory = registry.acquire(name)
        try:
            alpha = registry.get(name).alpha
            m = _target_logprobs(memory, ids)
        finally:
            registry.release(name)
        mixed[name] = _ppl(torch.logaddexp(math.log(alpha) + m, math.log(1 - alpha) + b))
    own = next(n for n, d in MEMORIES.items() if d == domain)
    assert min(mixed, key=mixed.__getitem__) == own, f"{domain}: base {_ppl(b):.1f}, mixtures {mixed}"


def test_zero_flag_serve_resolves_to_the_demo(monkeypatch, tmp_path):
    monkeypatch.delenv(cli.DEMO_ENV, raising=False)
    monkeypatch.chdir(REPO)  # ./demo
    config = cli.config_from_args(cli.build_parser().parse_args(["serve"]))
    assert config.model.model == str(DEMO / "base")
    assert {m.name: Path(m.path) for m in config.memories} == {n: DEMO / "memories" / n for n in MEMORIES}
    assert all(m.alpha is None for m in config.memories)  # each memory's manifest α applies
    assert config.port == 8000
    # A name a client can type, not the server's path; chat through memdec's plain template (the demo has none).
    assert config.served_model_name == cli.DEMO_MODEL_NAME == "memdec-demo"
    assert config.chat_template == PLAIN_CHAT_TEMPLATE and PLAIN_CHAT_TEMPLATE.is_file()
    named = cli.config_from_args(cli.build_parser().parse_args(["serve", "--served-model-name", "x"]))
    assert named.served_model_name == "x"  # still overrides

    monkeypatch.chdir(tmp_path)  # no ./demo here: the environment variable finds it (as in the image)
    monkeypatch.setenv(cli.DEMO_ENV, str(DEMO))
    config = cli.config_from_args(cli.build_parser().parse_args(["serve", "--memory", f"extra={tmp_path}"]))
    assert config.model.model == str(DEMO / "base")
    assert [m.name for m in config.memories] == ["biomed", "finance", "legal", "extra"]

    config = cli.config_from_args(cli.build_parser().parse_args(["serve", "--model", "other"]))
    assert config.model.model == "other" and config.memories == ()  # --model given: no demo
    assert config.served_model_name is None and config.chat_template is None
    # Without --served-model-name: a hub id as given, a local directory by its own name.
    assert default_served_name("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"
    assert default_served_name(str(DEMO / "base")) == "base"


def test_zero_flag_serve_without_a_demo_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.DEMO_ENV, raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--model" in err and cli.DEMO_ENV in err and str(tmp_path / "demo") in err
    monkeypatch.setenv(cli.DEMO_ENV, str(tmp_path / "missing"))
    with pytest.raises(SystemExit):
        cli.main(["serve"])
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_shipped_routers_load_with_their_memories(bases):
    """A shipped memory whose manifest names a router (demo/routers.sh) serves "alpha": "auto"; one without doesn't."""
    for _, registry in bases.values():
        for name in MEMORIES:
            manifest = json.loads((DEMO / "memories" / name / "memdec.json").read_text())
            assert registry.get(name).router == bool(manifest.get("router")), name
    assert all(bases["base"][1].get(n).router for n in ("biomed", "legal"))
