"""GGUF models (memories/gguf.py): tiny Llamas written as llama.cpp writes them (testkit/gguf.py), loaded,
tokenized, served as a base and as a hot-loaded memory, refused when broken, and used by the toolkit, each
checked against the safetensors model they were converted from (with the file's own rounding applied)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import gguf
import httpx
import pytest
import torch
from transformers import AutoTokenizer

from memories.cli import main as memory_main
from memories.manifest import read_manifest, tokenizer_fingerprint
from memories.models import ModelLoadError, load_causal_lm, load_tokenizer, resolve_source
from memories.quantize import Int4Linear, Int8Linear, quantize_model
from server import cli
from server.config import ModelConfig
from server.loader import load_base
from server.registry import MemoryRegistry
from testkit.gguf import write_gguf
from testkit.models import CHAT_TEMPLATE, build_model
from testkit.server import free_port
from testkit.text import sample_text
from tests.api_harness import ids_of, load_hf
from tests.engine_helpers import engine_for, greedy, run, tokens_of

QTYPES = ("F32", "F16", "Q8_0", "Q4_1")
PROMPT = "The committee expects"
TEXTS = [
    "The committee expects the report by Friday.",
    "  two leading spaces,\ttabs\n\nand blank lines  ",
    "unicode: café, naïve, 中文, emoji 🙂",
    "an <|endoftext|> inside the text",
    "",
]
MESSAGES = [{"role": "user", "content": "What does the committee expect?"}]
# Each broken file, and what its error must say besides its path.
BROKEN = {"truncated": "truncated", "renamed": "not a GGUF file", "alien": "architecture 'grok'"}


@pytest.fixture(scope="module")
def g(zoo, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """GGUF files of the zoo's Llama base in every type, one with a chat template, a Q4_1 memory, a memory
    of another tokenizer, and broken files. They sit in a folder of their own: transformers also reads a
    tokenizer_config.json beside a GGUF file."""
    root = tmp_path_factory.mktemp("gguf")
    files = root / "files"
    tok = AutoTokenizer.from_pretrained(str(zoo.tokenizer))
    mem_src = build_model(root / "mem_src", tok, "llama", hidden=32, seed=7)
    f32 = write_gguf(zoo.llama_base, files / "tiny-F32.gguf")
    broken = files / "broken"
    broken.mkdir()
    data = f32.read_bytes()
    (broken / "truncated.gguf").write_bytes(data[: len(data) // 2])
    shutil.copy(zoo.llama_base / "model.safetensors", broken / "renamed.gguf")  # safetensors renamed .gguf
    write_gguf(zoo.llama_base, broken / "alien.gguf", architecture="grok")  # llama.cpp's, not transformers'
    base = {q: write_gguf(zoo.llama_base, files / f"tiny-{q}.gguf", q) for q in QTYPES if q != "F32"}
    return SimpleNamespace(
        root=root,
        base={"F32": f32, **base},
        chat=write_gguf(zoo.llama_base, files / "tiny-chat-Q8_0.gguf", "Q8_0", chat_template=CHAT_TEMPLATE),
        mem_src=mem_src,
        mem=write_gguf(mem_src, files / "mem-Q4_1.gguf", "Q4_1"),
        foreign=write_gguf(zoo.mem_foreign, files / "foreign.gguf"),
        broken={kind: broken / f"{kind}.gguf" for kind in BROKEN},
        tok=tok,
        chat_tok=AutoTokenizer.from_pretrained(str(zoo.chat_base)),  # the same tokenizer, with CHAT_TEMPLATE
    )


def as_stored(hf_dir: Path, qtype: str):
    """The source model (plain transformers, float32) with every weight matrix rounded the way the GGUF
    stores it: float16, or gguf's own quantize -> dequantize. Norm weights (1-D) are stored in F32: kept."""
    model = load_hf(hf_dir)
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                if qtype == "F16":
                    p.copy_(p.half().float())
                elif qtype != "F32":
                    blocks = gguf.quants.quantize(p.numpy(), kind)
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, kind)))
    return model


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model, prompt: list[int], n: int, eos: int) -> list[int]:
    """transformers' greedy `generate`; the mask is explicit, as a prompt may hold the pad (= EOS) id."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=eos)[0, len(prompt):].tolist()
    assert len(out) == n
    return out


# -- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_logits_equal_the_source_model_with_its_weights_rounded_as_stored(g, zoo, qtype):
    model = load_causal_lm(g.base[qtype])
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
    assert (model.config.num_key_value_heads, model.config.tie_word_embeddings) == (2, False)
    ids = [0, 5, 17, 100, 383, 42, 7, *g.tok(PROMPT)["input_ids"]]
    got = logits(model, ids)
    tolerance = 1e-6 if qtype in ("F32", "F16") else 1e-5
    torch.testing.assert_close(got, logits(as_stored(zoo.llama_base, qtype), ids), atol=tolerance, rtol=0)
    if qtype != "F32":  # the rounding is really there: this test would see a file that stored otherwise
        assert (got - logits(load_hf(zoo.llama_base), ids)).abs().max() > 1e-3


def test_loaded_base_reports_the_weights_format_and_quantization(g, zoo):
    base = load_base(ModelConfig(str(g.base["Q4_1"])))
    assert (base.weights_format, base.quantization) == ("gguf", "Q4_1")
    assert (base.vocab_size, base.max_model_len) == (384, 512)
    plain = load_base(ModelConfig(str(zoo.llama_base)))
    assert (plain.weights_format, plain.quantization) == ("safetensors", None)


@pytest.mark.parametrize(("qtype", "scheme"), [("Q4_1", "int4"), ("Q8_0", "int8"), ("F16", None)])
def test_a_gguf_base_on_a_cpu_runs_in_its_files_precision_by_default(g, zoo, qtype, scheme):
    """`--quantization auto` (the default): a 4-bit file serves int4, an 8-bit one int8, F16 its dtype; served
    greedy tokens equal HF generate on the weights as stored, quantized the same way (the same kernels)."""
    base = load_base(ModelConfig(str(g.base[qtype])))
    assert base.serving_quantization == scheme
    reference = as_stored(zoo.llama_base, qtype)
    stored_q = reference.model.layers[0].self_attn.q_proj.weight.detach().clone()
    if scheme is not None:
        quantize_model(reference, scheme)
        layer = base.model.model.layers[0].self_attn.q_proj
        assert isinstance(layer, Int4Linear if scheme == "int4" else Int8Linear)
        # Q4_1 blocks re-quantize onto their own grid: only the bfloat16 scale and zero round (≤ 2^-8
        # relative).
        if scheme == "int4":
            assert (layer.weight - stored_q).abs().max().item() <= 2**-7 * stored_q.abs().max().item()
    ids = g.tok(PROMPT)["input_ids"]
    expected = hf_greedy(reference, ids, 12, g.tok.eos_token_id)
    out = run(engine_for((base, MemoryRegistry(base)), block_size=4), [greedy("r", tuple(ids), n=12)])
    assert tokens_of(out["r"]) == expected


def test_gguf_tokenizer_encodes_and_decodes_like_the_source(g):
    mine = load_tokenizer(g.base["F32"])
    assert tokenizer_fingerprint(mine) == tokenizer_fingerprint(g.tok) and len(mine) == len(g.tok)
    for attr in ("eos_token", "bos_token", "eos_token_id", "bos_token_id"):
        assert getattr(mine, attr) == getattr(g.tok, attr), attr
    for text in TEXTS:
        ids = mine(text)["input_ids"]
        assert ids == g.tok(text)["input_ids"], text
        assert mine.decode(ids) == g.tok.decode(ids) == text
    assert mine.chat_template is None  # none was written


def test_gguf_chat_template_renders_like_the_source(g):
    mine = load_tokenizer(g.chat)
    assert mine.chat_template == CHAT_TEMPLATE
    reply, again = {"role": "assistant", "content": "A report."}, {"role": "user", "content": "When?"}
    conversation = [*MESSAGES, reply, again]
    for messages in (MESSAGES, conversation):
        text = mine.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == g.chat_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text.endswith("<|assistant|>\n")
        assert mine(text)["input_ids"] == g.chat_tok(text)["input_ids"]


# -- broken files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*BROKEN, "missing"])
def test_broken_gguf_is_one_model_load_error_naming_the_file(g, kind):
    path = g.broken.get(kind, g.root / "files" / "missing.gguf")
    reason = BROKEN.get(kind, "does not exist")
    for load in (load_causal_lm, load_tokenizer, resolve_source):
        with pytest.raises(ModelLoadError) as exc:
            load(path)
        message = str(exc.value)
        assert str(path) in message and reason in message, message
        assert "\n" not in message and "Traceback" not in message
        # no exception of transformers' or numpy's chained to it ("during handling of the above exception …")
        error = exc.value
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


@pytest.mark.parametrize("kind", BROKEN)
def test_serve_with_a_broken_gguf_exits_2_with_one_line_naming_the_file(g, kind, capsys):
    path = g.broken[kind]
    code = cli.main(["serve", "--model", str(path), "--host", "127.0.0.1", "--port", str(free_port()),
                     "--log-level", "critical"])  # fmt: skip  # flag/value pairs on one line
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memdec serve: error:"), err
    assert str(path) in lines[0] and BROKEN[kind] in lines[0]
    assert code == 2  # a bad file, refused before anything loads (as a bad --registry file is)


# -- served -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(g, live_server):
    """`memdec serve` on the Q8_0 file with the chat template, hot-loading allowed; `--quantization none`: the
    file's weights dequantized to float32 (what the references below compute with)."""
    args = ["--model", str(g.chat), "--served-model-name", "tiny", "--enable-admin", "--quantization", "none"]
    with live_server("gguf", args) as s:
        yield s


def chat_ids(tokenizer) -> list[int]:
    return list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False))


def _get(server, path: str) -> dict:
    r = httpx.get(server.url + path, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def _greedy(server, n: int, **body) -> list[int]:
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": n, "logprobs": 0, "ignore_eos": True,
            "return_tokens_as_token_ids": True, **body}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return ids_of(r.json()["choices"][0]["logprobs"]["tokens"])


def test_served_gguf_base_card_names_its_format_and_quantization(served, g):
    (card,) = _get(served, "/v1/models")["data"]
    assert (card["id"], card["format"], card["quantization"]) == ("tiny", "gguf", "Q8_0")
    assert card["root"] == str(g.chat) and card["max_model_len"] == 512 and card["parent"] is None


def test_served_gguf_greedy_completion_equals_generate_on_the_reference(served, g, zoo):
    prompt = g.tok(PROMPT)["input_ids"]
    expected = hf_greedy(as_stored(zoo.llama_base, "Q8_0"), prompt, 8, g.tok.eos_token_id)
    assert _greedy(served, 8) == expected


def test_served_gguf_chat_uses_the_files_template(served, g):
    r = _post(served, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 0, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(chat_ids(g.chat_tok))


def test_gguf_memory_hot_loads_and_serves_as_its_reference(served, g, zoo):
    r = _post(served, "/v1/memories", {"name": "qmem", "path": str(g.mem)})
    assert r.status_code == 200, r.text
    card = r.json()
    assert (card["id"], card["parent"]) == ("qmem", "tiny")
    assert (card["format"], card["quantization"]) == ("gguf", "Q4_1")
    assert card["root"] == str(g.mem) and card["tokenizer_verified"]
    listed = {c["id"]: c for c in _get(served, "/v1/memories")["data"]}
    assert listed["qmem"]["format"] == "gguf" and listed["qmem"]["quantization"] == "Q4_1"
    prompt = g.tok(PROMPT)["input_ids"]
    expected = hf_greedy(as_stored(g.mem_src, "Q4_1"), prompt, 6, g.tok.eos_token_id)
    assert _greedy(served, 6, memory="qmem", alpha=1.0) == expected  # alpha 1: the memory alone
    # A safetensors memory beside the GGUF base: the tokenizers, read from either format, agree.
    r = _post(served, "/v1/memories", {"name": "med", "path": str(zoo.mem_llama)})
    assert r.status_code == 200, r.text
    assert (r.json()["format"], r.json()["quantization"]) == ("safetensors", None)
    for name in ("qmem", "med"):
        assert httpx.delete(f"{served.url}/v1/memories/{name}", timeout=60).status_code == 200


@pytest.mark.parametrize("kind", ["foreign", *BROKEN])
def test_refused_gguf_memory_is_a_400_naming_the_file_and_leaves_the_registry(served, g, kind):
    path = g.foreign if kind == "foreign" else g.broken[kind]
    before = _get(served, "/v1/models"), _get(served, "/v1/memories")
    r = _post(served, "/v1/memories", {"name": "bad", "path": str(path)})
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "path" and str(path) in err["message"]
    if kind == "foreign":
        assert err["code"] == "tokenizer_mismatch"
    else:
        assert BROKEN[kind] in err["message"]
    assert (_get(served, "/v1/models"), _get(served, "/v1/memories")) == before
    assert "Traceback" not in served.logs()


def test_tokenizer_flag_serves_a_gguf_with_that_directorys_tokenizer(g, zoo, live_server):
    """The Q4_1 file has no chat template; `--tokenizer` brings one (the zoo's chat tokenizer)."""
    assert load_tokenizer(g.base["Q4_1"]).chat_template is None
    with live_server("gguf-tok", ["--model", str(g.base["Q4_1"]), "--tokenizer", str(zoo.chat_base)]) as s:
        (card,) = _get(s, "/v1/models")["data"]
        assert (card["format"], card["quantization"]) == ("gguf", "Q4_1")
        r = _post(s, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 0, "max_tokens": 5,
                                              "ignore_eos": True, "logprobs": True,
                                              "return_tokens_as_token_ids": True})
        assert r.status_code == 200, r.text
        ids = chat_ids(g.chat_tok)
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        got = ids_of([t["token"] for t in r.json()["choices"][0]["logprobs"]["content"]])
        assert got == hf_greedy(as_stored(zoo.llama_base, "Q4_1"), ids, 5, g.tok.eos_token_id)


# -- toolkit ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf-corpus") / "general.txt"
    path.write_text(sample_text("general", 6_000), encoding="utf-8")
    return path


TRAIN = ["--beta", "0", "--seq-len", "32", "--train-batch-size", "2", "--quiet"]


def test_train_init_from_a_gguf(g, corpus, tmp_path):
    out = tmp_path / "mem"
    assert memory_main(["memory", "train", "--base", str(g.base["F32"]), "--init-from", str(g.base["Q8_0"]),
                        "--corpus", str(corpus), "--out", str(out), "--max-steps", "2", "--name", "gmem",
                        *TRAIN]) == 0  # fmt: skip  # flag/value pairs on one line
    manifest = read_manifest(out)
    assert manifest.training["steps"] == 2 and manifest.tokenizer_fingerprint == tokenizer_fingerprint(g.tok)
    assert manifest.base_model == str(g.base["F32"].resolve())
    trained = load_causal_lm(out)  # an ordinary safetensors model, claiming no quantization
    assert trained.config.hidden_size == 64 and not hasattr(trained.config, "quantization_config")
    after = trained.model.layers[0].mlp.up_proj.weight
    before = load_causal_lm(g.base["Q8_0"]).model.layers[0].mlp.up_proj.weight
    assert after.shape == before.shape and not torch.equal(after, before)  # trained from the GGUF's weights


def test_init_embeddings_from_a_gguf_are_its_embedding_on_its_top_singular_vectors(g, zoo, corpus, tmp_path):
    out, r = tmp_path / "mem", 32
    # One step at learning rate 0 saves the model as initialised.
    assert memory_main(["memory", "train", "--base", str(g.base["F32"]), "--init-embeddings-from",
                        str(g.base["F32"]), "--hidden-size", str(r), "--layers", "1", "--heads", "4",
                        "--max-len", "64", "--corpus", str(corpus), "--out", str(out), "--max-steps", "1",
                        "--lr", "0", *TRAIN]) == 0  # fmt: skip  # flag/value pairs on one line
    model = load_causal_lm(out)
    mine = model.get_input_embeddings().weight.detach()  # [V, r]
    assert torch.equal(model.get_output_embeddings().weight, mine)  # tied: the output layer follows
    source = load_hf(zoo.llama_base).get_input_embeddings().weight.detach()  # [V, 64], from the safetensors
    _, _, vh = torch.linalg.svd(source.double(), full_matrices=False)
    expected = (source.double() @ vh[:r].T).float()  # E·V_r
    assert mine.shape == expected.shape == (384, r)
    for j in range(r):  # a singular vector's sign is arbitrary
        sign = 1.0 if torch.dot(mine[:, j], expected[:, j]) >= 0 else -1.0
        torch.testing.assert_close(mine[:, j], sign * expected[:, j], atol=1e-4, rtol=1e-4)
