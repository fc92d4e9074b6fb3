"""The paper's published memories and plain Hugging Face checkpoints, served unchanged, with stand-ins made
here in the published layouts (nothing is downloaded):

- `Clover-Hill/MemoryDecoder-gpt2-small`: a GPT-2 memory, `model.safetensors` and GPT-2 tokenizer files
  (`vocab.json`, `merges.txt`, `tokenizer.json`, ...), no `memdec.json`;
- the Qwen-family domain memories: a Qwen2 memory with a padded, tied vocabulary, `pytorch_model.bin`, no
  tokenizer, no manifest (refused by the server with the command that converts it; `memdec memory import`);
- the same directories in a throw-away Hugging Face cache, so hub ids (and `@revision`) resolve with
  HF_HUB_OFFLINE=1.

Served distributions are checked against full no-cache forwards and the formula
`logaddexp(log_softmax(base) + log(1−λ), log_softmax(mem / T) + log(λ))` at every step (float32, ≤ 1e-4).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from memories import cli as memories_cli
from memories.manifest import PAPER_ALPHA, read_manifest, tokenizer_fingerprint
from server import cli
from server.config import MemorySpec, ModelConfig, ServerConfig, read_registry_file
from testkit.models import build_tokenizer
from testkit.server import free_port
from testkit.text import sample_text
from tests.api_harness import InProcessServer, assert_error, ids_of, load_hf

HUB_MEMORY = "Clover-Hill/MemoryDecoder-gpt2-small"
HUB_BASE = "openai-community/gpt2-standin"
HUB_QWEN = "Clover-Hill/MemoryDecoder-Qwen-biomed-standin"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
PROMPT = "The committee said that the patient"


def gpt2_tokenizer_files(tok, out: Path) -> None:
    """The files of GPT-2's hub repository: tokenizer.json, tokenizer_config.json, vocab.json, merges.txt,
    special_tokens_map.json (the same token->id map as `tok`)."""
    tok.save_pretrained(str(out))
    tok.backend_tokenizer.model.save(str(out))  # vocab.json + merges.txt
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    special = {"bos_token": tok.eos_token, "eos_token": tok.eos_token, "unk_token": tok.eos_token}
    (out / "special_tokens_map.json").write_text(json.dumps(special))


def gpt2_model(out: Path, vocab: int, eos: int, seed: int, hidden: int = 48) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=hidden, n_layer=2, n_head=4,
                        bos_token_id=eos, eos_token_id=eos, initializer_range=0.3)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(str(out))
    return model


def qwen_model(out: Path, vocab: int, eos: int, seed: int) -> Qwen2ForCausalLM:
    """Qwen2.5-style: embedding padded past the tokenizer, tied input and output embeddings."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=eos, eos_token_id=eos, initializer_range=0.3, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(str(out))
    return model


def llama_model(out: Path, vocab: int, eos: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=eos, eos_token_id=eos, initializer_range=0.3, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(out))
    return model


def as_pickle(model: torch.nn.Module, out: Path) -> None:
    """`pytorch_model.bin` in place of the safetensors (as the published Qwen/Llama memories are stored)."""
    for f in out.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), out / "pytorch_model.bin")


def cache_repo(hub_cache: Path, repo_id: str, src: Path, commit: str = COMMIT,
               ref: str | None = "main") -> None:
    """`src` as snapshot `commit` of `repo_id` in a Hugging Face cache (refs/<ref> names it)."""
    folder = hub_cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(src, folder / "snapshots" / commit)
    if ref is not None:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)


@dataclass(frozen=True)
class Published:
    root: Path
    hub_cache: Path
    base: Path  # GPT-2 base, GPT-2 tokenizer files
    gpt2_memory: Path  # safetensors + GPT-2 tokenizer files, no manifest
    gpt2_memory_old: Path  # another revision of the same repository (other weights)
    qwen_bin: Path  # pytorch_model.bin, padded tied vocabulary, no tokenizer, no manifest
    qwen_bare: Path  # the same as safetensors, still no tokenizer or manifest
    llama_bin: Path  # Llama-family: pytorch_model.bin, untied embeddings, no tokenizer, no manifest
    foreign: Path  # GPT-2 memory whose tokenizer maps tokens differently
    small_vocab: Path  # no tokenizer, an embedding smaller than the base vocabulary
    wrong_eos: Path  # no tokenizer, its config's EOS id is not the base's


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    root = tmp_path_factory.mktemp("published")
    tok = build_tokenizer(root / "tok")
    vocab, eos = len(tok), tok.eos_token_id
    base = root / "gpt2"
    gpt2_model(base, vocab, eos, seed=11, hidden=64)
    gpt2_tokenizer_files(tok, base)
    memory = root / "MemoryDecoder-gpt2-small"
    gpt2_model(memory, vocab, eos, seed=12)
    gpt2_tokenizer_files(tok, memory)
    old = root / "MemoryDecoder-gpt2-small-old"
    gpt2_model(old, vocab, eos, seed=13)
    gpt2_tokenizer_files(tok, old)
    qwen_bin = root / "MemoryDecoder-Qwen-biomed"
    as_pickle(qwen_model(qwen_bin, vocab + 61, eos, seed=14), qwen_bin)
    llama_bin = root / "MemoryDecoder-Llama-law"
    as_pickle(llama_model(llama_bin, vocab, eos, seed=19), llama_bin)
    qwen_bare = root / "qwen-bare"
    qwen_model(qwen_bare, vocab + 61, eos, seed=15)
    foreign_tok = build_tokenizer(root / "foreign_tok", vocab_size=vocab, text=sample_text("legal", 20_000))
    foreign = root / "foreign"
    gpt2_model(foreign, vocab, eos, seed=16)
    gpt2_tokenizer_files(foreign_tok, foreign)
    small = root / "small-vocab"
    gpt2_model(small, vocab - 10, 0, seed=17)
    wrong_eos = root / "wrong-eos"
    gpt2_model(wrong_eos, vocab, eos + 5, seed=18)
    hub_cache = root / "hf" / "hub"
    cache_repo(hub_cache, HUB_BASE, base)
    cache_repo(hub_cache, HUB_MEMORY, memory)
    cache_repo(hub_cache, HUB_MEMORY, old, commit=OLD_COMMIT, ref=None)  # reachable as @<commit> only
    cache_repo(hub_cache, HUB_QWEN, qwen_bin)
    with pytest.MonkeyPatch.context() as mp:  # a throw-away cache, offline: nothing can be downloaded
        mp.setenv("HF_HOME", str(root / "hf"))
        mp.setenv("HF_HUB_CACHE", str(hub_cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield Published(root, hub_cache, base, memory, old, qwen_bin, qwen_bare, llama_bin, foreign, small,
                        wrong_eos)


@torch.no_grad()
def reference(base, mem, ids: list[int], alpha: float, temperature: float, vocab: int) -> torch.Tensor:
    x = torch.tensor([ids])
    b = torch.log_softmax(base(x).logits[0, -1, :vocab].float(), -1)
    m = torch.log_softmax(mem(x).logits[0, -1, :vocab].float() / temperature, -1)
    return torch.logaddexp(b + math.log1p(-alpha), m + math.log(alpha))


def assert_mixture(server: InProcessServer, base_dir: Path, mem_dir: Path, memory: str, alpha: float,
                   temperature: float, **extra) -> None:
    """Greedy completion with top-20 log-probs: every step's chosen token and alternatives equal the
    formula."""
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    vocab = len(tok)
    base, mem = load_hf(base_dir), load_hf(mem_dir)
    out = server.complete(prompt=PROMPT, memory=memory, alpha=alpha, temperature=0, max_tokens=8,
                          ignore_eos=True, logprobs=20, return_tokens_as_token_ids=True, **extra)
    lp = out["choices"][0]["logprobs"]
    ids = tok(PROMPT)["input_ids"]
    for token, top in zip(ids_of(lp["tokens"]), lp["top_logprobs"], strict=True):
        ref = reference(base, mem, ids, alpha, temperature, vocab)
        assert token == int(ref.argmax())
        for name, value in top.items():
            assert abs(value - ref[int(name.split(":")[1])].item()) <= 1e-4
        ids.append(token)


def memory_cards(server: InProcessServer) -> dict[str, dict]:
    return {c["id"]: c for c in server.get("/v1/memories").json()["data"]}


# -- any source, no manifest ----------------------------------------------------------------------------


def test_gpt2_memory_without_manifest_serves_with_defaults(published):
    config = ServerConfig(model=ModelConfig(str(published.base)),
                          memories=(MemorySpec("wiki", str(published.gpt2_memory)),))
    with InProcessServer(config) as s:
        card = memory_cards(s)["wiki"]
        assert ((card["alpha"], card["domain"], card["temperature"], card["tokenizer_verified"])
                == (PAPER_ALPHA, "general", 1.0, True))
        assert card["parent"] == "gpt2"
        assert_mixture(s, published.base, published.gpt2_memory, "wiki", PAPER_ALPHA, 1.0)
        assert_mixture(s, published.base, published.gpt2_memory, "wiki", 0.3, 1.7, memory_temperature=1.7)


def test_hub_ids_resolve_through_the_offline_cache(published):
    """`--model` and `--memory` as hub ids (and `@revision`), read from the HF cache with HF_HUB_OFFLINE=1."""
    config = ServerConfig(
        model=ModelConfig(HUB_BASE),
        memories=(MemorySpec("wiki", HUB_MEMORY, 0.6), MemorySpec("wiki_old", f"{HUB_MEMORY}@{OLD_COMMIT}")),
    )
    with InProcessServer(config) as s:
        models = {c["id"]: c for c in s.get("/v1/models").json()["data"]}
        assert models[HUB_BASE]["root"] == HUB_BASE and models["wiki"]["root"] == HUB_MEMORY
        assert models["wiki_old"]["root"] == f"{HUB_MEMORY}@{OLD_COMMIT}"
        assert_mixture(s, published.base, published.gpt2_memory, "wiki", 0.6, 1.0, model=HUB_BASE)
        assert_mixture(s, published.base, published.gpt2_memory_old, "wiki_old", 0.6, 0.8,
                       memory_temperature=0.8)
        # perplexity under a memory temperature, from the hub-id memory
        tok = AutoTokenizer.from_pretrained(str(published.base))
        text = "The committee said that the patient was given a dose."
        r = s.post("/v1/perplexity",
                   {"memory": "wiki", "alpha": [0.25, 0.6], "input": text, "memory_temperature": 1.5})
        assert r.status_code == 200, r.text
        ids = tok(text)["input_ids"]
        base, mem = load_hf(published.base), load_hf(published.gpt2_memory)
        with torch.no_grad():
            x = torch.tensor([ids])
            b = torch.log_softmax(base(x).logits[0, :-1, : len(tok)].float(), -1)
            m = torch.log_softmax(mem(x).logits[0, :-1, : len(tok)].float() / 1.5, -1)
        t = torch.tensor(ids[1:])[:, None]
        b, m = b.gather(-1, t)[:, 0], m.gather(-1, t)[:, 0]
        doc = r.json()["data"][0]
        assert abs(doc["memory_nll"] + m.mean().item()) <= 1e-4
        for entry in doc["alphas"]:
            a = entry["alpha"]
            assert abs(entry["nll"] + torch.logaddexp(b + math.log1p(-a),
                                                      m + math.log(a)).mean().item()) <= 1e-4


def test_an_uncached_hub_id_offline_is_a_clear_4xx(published):
    config = ServerConfig(model=ModelConfig(str(published.base)), enable_admin=True)
    with InProcessServer(config) as s:
        err = assert_error(s.post("/v1/memories", {"name": "x", "path": "nobody/not-cached"}), 400, "path")
        assert "HF_HUB_OFFLINE" in err["message"] and "nobody/not-cached" in err["message"]
        assert memory_cards(s) == {}


def test_memory_temperature_needs_a_memory_and_a_sane_value(published):
    config = ServerConfig(model=ModelConfig(str(published.base)),
                          memories=(MemorySpec("wiki", str(published.gpt2_memory)),))
    with InProcessServer(config) as s:
        assert_error(s.post("/v1/completions", {"prompt": "x", "memory_temperature": 2.0}), 400,
                     "memory_temperature")
        for bad in (0, -1, 1000, "hot"):
            assert_error(s.post("/v1/completions", {"prompt": "x", "memory": "wiki",
                                                    "memory_temperature": bad}), 400, "memory_temperature")
            assert_error(s.post("/v1/perplexity", {"input": "x y z", "memory": "wiki",
                                                   "memory_temperature": bad}), 400, "memory_temperature")
        chat = {"messages": [{"role": "user", "content": "hi"}], "memory": "wiki", "memory_temperature": 0.0}
        assert_error(s.post("/v1/chat/completions", chat), 400, "memory_temperature")
        assert_error(s.post("/v1/perplexity", {"input": "x y z", "memory_temperature": 2.0}), 400,
                     "memory_temperature")


# -- tokenizer verification -------------------------------------------------------------------------------


def test_memory_without_tokenizer_is_checked_by_vocabulary_and_special_ids(published):
    config = ServerConfig(model=ModelConfig(str(published.base)), enable_admin=True,
                          memory_root=published.root)
    with InProcessServer(config) as s:
        card = s.post("/v1/memories", {"name": "bare", "path": "qwen-bare"})
        assert card.status_code == 200, card.text
        assert card.json()["tokenizer_verified"] is False and card.json()["alpha"] == PAPER_ALPHA
        assert_mixture(s, published.base, published.qwen_bare, "bare", 0.7, 0.6, memory_temperature=0.6)
        for path, what in (("small-vocab", "rows"), ("wrong-eos", "_token_id"), ("foreign", "token->id map")):
            err = assert_error(s.post("/v1/memories", {"name": "bad", "path": path}), 400, "path",
                               "tokenizer_mismatch")
            assert what in err["message"], err
            assert path in err["message"] and str(published.base) in err["message"]  # names both models
        assert sorted(memory_cards(s)) == ["bare"]  # the registry is unchanged by the refusals


# -- pickled checkpoints: refused by the server, converted by `memdec memory import` -------------------------


def test_pickled_memory_is_refused_with_the_import_command(published, capsys):
    config = ServerConfig(model=ModelConfig(str(published.base)), enable_admin=True,
                          memory_root=published.root, allow_hub_memories=True)
    with InProcessServer(config) as s:
        for path in (published.qwen_bin.name, HUB_QWEN):
            err = assert_error(s.post("/v1/memories", {"name": "bio", "path": path}), 400, "path",
                               "pickled_weights")
            assert "memdec memory import" in err["message"], err
        assert memory_cards(s) == {}
    port = free_port()
    argv = ["serve", "--model", str(published.base), "--memory", f"bio={published.qwen_bin}",
            "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error"]  # fmt: skip  # flag/value pairs on one line
    assert cli.main(argv) == 1
    assert "memdec memory import" in capsys.readouterr().err


def sharded(src: Path, out: Path) -> Path:
    """`src`'s pickled weights as two shards with their index, as large checkpoints are published."""
    shutil.copytree(src, out)
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    (out / "pytorch_model.bin").unlink()
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        shard = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, out / shard)
        weight_map.update({k: shard for k in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.mark.parametrize("source", ["dir", "hub", "sharded", "llama"])
def test_import_round_trips_the_weights_bit_for_bit_and_serves(published, tmp_path, source):
    checkpoint = published.llama_bin if source == "llama" else published.qwen_bin
    src = ({"dir": str(checkpoint), "llama": str(checkpoint), "hub": HUB_QWEN}.get(source)
           or str(sharded(checkpoint, tmp_path / "shards")))
    out = tmp_path / "bio"
    code = memories_cli.main(["memory", "import", src, str(out), "--base", str(published.base),
                              "--name", "bio", "--domain", "biomedical", "--alpha", "0.4",
                              "--temperature", "1.25"])  # fmt: skip  # flag/value pairs on one line
    assert code == 0
    original = torch.load(checkpoint / "pytorch_model.bin", weights_only=True)
    converted = load_file(str(out / "model.safetensors"))
    assert set(converted) == set(original)
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype and converted[name].shape == tensor.shape
        assert torch.equal(converted[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name
    manifest = read_manifest(out)
    tok = AutoTokenizer.from_pretrained(str(published.base))
    assert manifest.tokenizer_fingerprint == tokenizer_fingerprint(tok)
    assert ((manifest.name, manifest.domain, manifest.alpha, manifest.temperature)
            == ("bio", "biomedical", 0.4, 1.25))
    assert not list(out.glob("*.bin"))
    config = ServerConfig(model=ModelConfig(str(published.base)), memories=(MemorySpec("bio", str(out)),))
    with InProcessServer(config) as s:
        card = memory_cards(s)["bio"]
        assert ((card["tokenizer_verified"], card["alpha"], card["temperature"], card["domain"])
                == (True, 0.4, 1.25, "biomedical"))
        # the weights are the original's, bit for bit
        assert_mixture(s, published.base, out, "bio", 0.4, 1.25)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_import_refuses_a_pickle_that_carries_code(published, tmp_path, capsys):
    evil = tmp_path / "evil"
    shutil.copytree(published.qwen_bin, evil)
    marker = tmp_path / "code-ran"
    state = torch.load(evil / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, evil / "pytorch_model.bin")
    out = tmp_path / "out"
    code = memories_cli.main(["memory", "import", str(evil), str(out), "--base", str(published.base)])
    assert code == 2
    err = capsys.readouterr().err
    assert "weights_only" in err and "refused" in err
    assert not marker.exists()  # nothing in the pickle ran
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_import_refuses_a_memory_for_another_tokenizer(published, tmp_path, capsys):
    assert memories_cli.main(["memory", "import", str(published.foreign), str(tmp_path / "o"),
                              "--base", str(published.base)]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert memories_cli.main(["memory", "import", str(published.small_vocab), str(tmp_path / "o"),
                              "--base", str(published.base)]) == 2
    assert "scores" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- hub memories under --memory-root ------------------------------------------------------------------------


def test_hub_ids_under_a_memory_root_need_allow_hub_memories(published):
    for allow in (False, True):
        config = ServerConfig(model=ModelConfig(str(published.base)), enable_admin=True,
                              memory_root=published.root, allow_hub_memories=allow)
        with InProcessServer(config) as s:
            r = s.post("/v1/memories", {"name": "wiki", "path": HUB_MEMORY})
            if not allow:
                assert_error(r, 403, "path", "hub_not_allowed")
                assert memory_cards(s) == {}
                # a directory of that name under the root is still a directory
                assert s.post("/v1/memories",
                              {"name": "local", "path": published.gpt2_memory.name}).status_code == 200
            else:
                assert r.status_code == 200, r.text
                assert r.json()["root"] == HUB_MEMORY
                assert_error(s.post("/v1/memories", {"name": "x", "path": "/etc"}), 403, "path",
                             "path_not_allowed")


# -- a persisted registry ------------------------------------------------------------------------------------


def test_persisted_registry_survives_a_restart_and_a_crash_mid_write(published, tmp_path, monkeypatch):
    registry = tmp_path / "registry.json"  # does not exist yet: --persist-registry starts empty
    config = ServerConfig(model=ModelConfig(str(published.base)), registry_file=registry,
                          persist_registry=True, enable_admin=True, memory_root=published.root,
                          allow_hub_memories=True)
    with InProcessServer(config) as s:
        for body in ({"name": "wiki", "path": HUB_MEMORY, "alpha": 0.35},
                     {"name": "bare", "path": "qwen-bare"},
                     {"name": "gone", "path": published.gpt2_memory.name, "alpha": 0.9}):
            assert s.post("/v1/memories", body).status_code == 200
        assert s.delete("/v1/memories/gone").status_code == 200
        before = memory_cards(s)
        saved = json.loads(registry.read_text())
        assert saved == [{"name": "wiki", "path": HUB_MEMORY, "alpha": 0.35},
                         {"name": "bare", "path": str(published.qwen_bare.resolve()), "alpha": PAPER_ALPHA}]

        # A crash between writing the new file and renaming it (kill -9 there, simulated): the old file stays
        # whole, and the half-done temporary file is never read.
        def crash(src, dst):
            raise OSError("killed mid-write")

        monkeypatch.setattr(os, "replace", crash)
        err = assert_error(s.post("/v1/memories", {"name": "late", "path": published.gpt2_memory.name}), 500)
        assert err["code"] == "registry_write_failed"
        monkeypatch.undo()
        assert json.loads(registry.read_text()) == saved
        (tmp_path / ".registry.json.leftover.tmp").write_text('[{"name": "half')  # what a kill -9 could leave
    assert read_registry_file(registry) == (
        MemorySpec("wiki", HUB_MEMORY, 0.35),
        MemorySpec("bare", str(published.qwen_bare.resolve()), PAPER_ALPHA),
    )
    with InProcessServer(config) as s:  # restart: the same memories with the same alpha
        after = memory_cards(s)
        assert {k: (c["alpha"], c["root"]) for k, c in after.items()} == {
            k: (c["alpha"], c["root"]) for k, c in before.items()
        }


def test_persist_registry_needs_a_registry_file(capsys):
    assert cli.main(["serve", "--model", "unused", "--persist-registry"]) == 2
    assert "--registry" in capsys.readouterr().err


# -- bench/paper_table.py ------------------------------------------------------------------------------------


def test_paper_table_through_a_running_server(published, live_server, tmp_path, capsys):
    """The published GPT-2 pair's stand-ins served by hub id (offline cache), the base under GPT-2's name: the
    table's numbers are the server's `/v1/perplexity` at 1024/512, next to the published ones."""
    from bench import paper_table

    text = tmp_path / "wiki.test.txt"
    text.write_text((" = Robert Boulter = \n"
                     " Robert Boulter is an English film , television and theatre actor . \n") * 8)
    # nothing listens there
    assert paper_table.main(["--server", "http://127.0.0.1:9", "--text", str(text)]) == 2
    assert "no memdec server answers" in capsys.readouterr().err
    assert paper_table.main(["--server", "http://127.0.0.1:9", "--text", str(tmp_path / "missing.txt")]) == 2
    env = {"HF_HOME": str(published.hub_cache.parent), "HF_HUB_CACHE": str(published.hub_cache),
           "HF_HUB_OFFLINE": "1"}
    args = ["--model", HUB_BASE, "--served-model-name", "gpt2", "--memory", f"wiki={HUB_MEMORY}"]
    with live_server("paper", args, env=env) as s:
        out = tmp_path / "rows.json"
        assert paper_table.main(["--server", s.url, "--text", str(text), "--out", str(out)]) == 0
        table = capsys.readouterr().out
        assert "| gpt2 | wiki | 0.55 |" in table and "24.89 → 13.36" in table
        (row,) = json.loads(out.read_text())
        import httpx

        direct = httpx.post(s.url + "/v1/perplexity",
                            json={"memory": "wiki", "input": text.read_text(), "context_length": 1024,
                                  "stride": 512}, timeout=60).json()["overall"]
        assert row["mixed_ppl"] == direct["perplexity"] and row["base_ppl"] == direct["base_perplexity"]
        assert paper_table.main(["--server", s.url, "--text", str(text), "--memory", "nope"]) == 2
        assert "does not serve nope" in capsys.readouterr().err
