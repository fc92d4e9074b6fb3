"""The memory toolkit end to end (`memdec memory build`) and its parts against independent references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from memories.cli import main
from memories.corpus import CorpusError, tokenize_corpus
from memories.crosseval import CROSS_SOURCE, IN_SOURCE, combine
from memories.datastore import Datastore, build_datastore
from memories.hooks import capture_mlp_input, last_mlp
from memories.knn import IndexConfig, build_index, search_excluding_self
from memories.loss import memory_loss, sparse_kl
from memories.manifest import read_manifest, tokenizer_fingerprint
from memories.mixing import mix_scalar
from memories.models import load_causal_lm
from memories.sources import domain_holdout, holdout_split
from memories.targets import SparseTargets, build_targets, knn_distribution
from memories.train import TrainConfig, train
from testkit.models import build_model, build_tokenizer
from testkit.text import DRUGS, sample_text, write_corpus

SMALL_MODEL = ["--hidden-size", "64", "--layers", "2", "--heads", "4", "--max-len", "256"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer and a tiny base LM trained on general English with the toolkit's own trainer (β = 0),
    plus a synthetic domain corpus (train / held-out) the base has never seen."""
    root = tmp_path_factory.mktemp("toolkit")
    build_tokenizer(root / "tok", vocab_size=384, text=sample_text("general", 40_000))
    general = root / "general.txt"
    general.write_text(sample_text("general", 100_000), encoding="utf-8")
    rc = main([
        "memory", "train", "--tokenizer", str(root / "tok"), "--corpus", str(general), "--beta", "0",
        "--out", str(root / "base"), *SMALL_MODEL, "--seq-len", "128", "--max-steps", "60", "--lr", "3e-3",
        "--quiet",
    ])
    assert rc == 0
    return {
        "root": root,
        "base": root / "base",
        "train": write_corpus(root / "domain" / "train.txt", 120, seed=1),
        "valid": write_corpus(root / "domain" / "valid.txt", 25, seed=2),
    }


def _reference_logprobs(model: torch.nn.Module, ids: torch.Tensor, context: int, stride: int,
                        vocab: int) -> torch.Tensor:
    """Sliding-window log-probabilities written out plainly: full log_softmax over each window."""
    out, scored_until = [], 1
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + context, len(ids))
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None, begin:end]).logits[0, :, :vocab].float(), -1)
        for t in range(max(scored_until, begin + 1), end):
            out.append(logp[t - 1 - begin, ids[t]])
        scored_until = end
        if end == len(ids):
            break
    return torch.stack(out)


def test_build_end_to_end_improves_heldout_perplexity(env: dict[str, Path],
                                                      capsys: pytest.CaptureFixture) -> None:
    out = env["root"] / "memory"
    argv = [
        "memory", "build", "--base", str(env["base"]), "--corpus", str(env["train"]),
        "--valid", str(env["valid"]), "--out", str(out), "--name", "synthmed", "--domain", "synthetic",
        "--k", "32", "--context", "128", *SMALL_MODEL, "--seq-len", "64", "--train-batch-size", "8",
        "--epochs", "2", "--lr", "3e-3", "--quiet",
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "datastore: running" in first and "eval: running" in first

    # What the server loads: safetensors weights + tokenizer + a manifest that matches the base tokenizer.
    tok = AutoTokenizer.from_pretrained(env["base"])
    manifest = read_manifest(out)
    assert manifest.name == "synthmed" and manifest.domain == "synthetic"
    assert manifest.base_model == str(env["base"].resolve())
    assert manifest.tokenizer_fingerprint == tokenizer_fingerprint(tok)
    assert (out / "model.safetensors").is_file()
    assert manifest.corpus["datastore_entries"] == manifest.corpus["tokens"] - 1
    assert manifest.corpus["k"] == 32 and manifest.corpus["index"]["kind"] == "flat"

    # The training loss fell.
    log = json.loads((out / "training_log.json").read_text())
    assert np.mean(log["loss"][-10:]) < 0.6 * np.mean(log["loss"][:5])
    assert np.mean(log["kl"][-10:]) < np.mean(log["kl"][:5])

    # The report agrees with an independent sliding-window computation, and the mixture beats the base.
    report = json.loads((out / "evaluation.json").read_text())
    assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert manifest.alpha == report["best_alpha"] and 0 < manifest.alpha < 1
    assert manifest.evaluation["best_ppl"] == report["best_ppl"]
    base = AutoModelForCausalLM.from_pretrained(env["base"], use_safetensors=True).eval()
    memory = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    tokens, _ = tokenize_corpus(tok, env["valid"], progress=False)
    ids = torch.as_tensor(tokens, dtype=torch.long)
    ctx, stride, vocab = report["context"], report["stride"], len(tok)
    assert ctx == 256 and stride == 128
    b = _reference_logprobs(base, ids, ctx, stride, vocab)
    m = _reference_logprobs(memory, ids, ctx, stride, vocab)
    assert len(b) == report["tokens_scored"] == len(ids) - 1
    assert math.exp(-b.double().mean()) == pytest.approx(report["base_ppl"], rel=1e-4)
    assert math.exp(-m.double().mean()) == pytest.approx(report["memory_ppl"], rel=1e-4)
    a = report["best_alpha"]
    mixed = [mix_scalar(float(x), float(y), a) for x, y in zip(b, m, strict=True)]
    assert math.exp(-np.mean(mixed)) == pytest.approx(report["best_ppl"], rel=1e-4)
    assert report["best_ppl"] < 0.5 * report["base_ppl"]
    assert report["memory_ppl"] < report["base_ppl"]

    # The memory learned the domain's associations: after "Patients with kelitosis were treated with",
    # its top continuation starts the right drug, which the base does not know.
    prompt = torch.tensor([tok("Patients with kelitosis were treated with",
                               add_special_tokens=False)["input_ids"]])
    drug_first = tok(" " + DRUGS[0], add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        assert int(memory(input_ids=prompt).logits[0, -1, :vocab].argmax()) == drug_first

    # Re-running skips every stage; a new α grid re-runs only the evaluation.
    marker_mtimes = {p.name: p.stat().st_mtime_ns for p in (out.parent / "memory.work" / "stages").iterdir()}
    assert main(argv) == 0
    second = capsys.readouterr().out
    for stage in ("datastore", "index", "targets", "train", "eval"):
        assert f"{stage}: cached" in second
    assert main([*argv, "--alphas", "0.25,0.5,0.75"]) == 0
    third = capsys.readouterr().out
    assert "train: cached" in third and "eval: running" in third
    after = {p.name: p.stat().st_mtime_ns for p in (out.parent / "memory.work" / "stages").iterdir()}
    assert {k for k in after if after[k] != marker_mtimes.get(k)} == {"eval.json"}
    assert read_manifest(out).alpha in (0.25, 0.5, 0.75)


def test_sparse_kl_equals_dense_kl() -> None:
    torch.manual_seed(0)
    B, T, V, K = 2, 5, 23, 6
    logits = torch.randn(B, T, V, dtype=torch.float64) * 3
    ids = torch.stack([torch.stack([torch.randperm(V)[:K] for _ in range(T)]) for _ in range(B)])  # [B, T, K]
    probs = torch.rand(B, T, K, dtype=torch.float64)
    probs[..., -2:] = 0.0  # padding slots, as in a padded batch
    probs[0, 1] = 0.0  # a position with no kNN target
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-30)
    dense = torch.zeros(B, T, V, dtype=torch.float64).scatter_add(-1, ids, probs)  # reference only
    labels = torch.randint(0, V, (B, T))

    l1 = logits.clone().requires_grad_(True)
    ref_kl = F.kl_div(torch.log_softmax(l1, -1), dense, reduction="none").sum(-1)  # [B, T]
    torch.testing.assert_close(sparse_kl(logits, ids, probs), ref_kl.detach())
    has = dense.sum(-1) > 0
    ref = 0.5 * ref_kl[has].mean() + 0.5 * F.cross_entropy(l1.reshape(-1, V), labels.reshape(-1))
    ref.backward()

    l2 = logits.clone().requires_grad_(True)
    parts = memory_loss(l2, labels, ids, probs, beta=0.5)
    parts.loss.backward()
    # memory_loss works in float32 (as in training); the reference ran in float64.
    torch.testing.assert_close(parts.loss.detach(), ref.detach().float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l2.grad, l1.grad, rtol=1e-4, atol=1e-6)


def test_knn_distribution_matches_dense_histogram() -> None:
    rng = np.random.default_rng(0)
    Q, k, V = 7, 40, 9
    dists = rng.uniform(0, 5, (Q, k)).astype(np.float32)
    ids = rng.integers(0, 100, (Q, k))
    ids[3, -5:] = -1  # missing neighbours
    ids[5, :] = -1  # a query with no neighbour at all
    values = rng.integers(0, V, 100)
    counts, toks, probs = knn_distribution(dists, ids, values, temperature=0.7)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for q in range(Q):
        dense = np.zeros(V)
        ok = ids[q] >= 0
        if ok.any():
            w = np.exp(-dists[q][ok] / 0.7)
            np.add.at(dense, values[ids[q][ok]], w / w.sum())
        row_t, row_p = toks[offsets[q] : offsets[q + 1]], probs[offsets[q] : offsets[q + 1]]
        assert list(row_t) == sorted(set(row_t.tolist()))
        got = np.zeros(V)
        got[row_t] = row_p
        np.testing.assert_allclose(got, dense, atol=1e-6)
    assert counts[5] == 0


def _duplicated_keys(n_unique: int = 150, copies: int = 3, dim: int = 16) -> np.ndarray:
    base = np.random.default_rng(1).normal(size=(n_unique, dim)).astype(np.float16)
    return np.repeat(base, copies, axis=0)  # rows 3i, 3i+1, 3i+2 are identical


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_self_exclusion_never_returns_the_query(kind: str) -> None:
    keys = _duplicated_keys()
    config = IndexConfig(kind=kind, nlist=8, code_size=4, nprobe=8, seed=0)
    index, info = build_index(keys, config, progress=False)
    assert info["kind"] == kind
    ids_q = np.arange(len(keys))
    dist, ids = search_excluding_self(index, keys, ids_q, k=5)
    assert ids.shape == (len(keys), 5)
    assert not (ids == ids_q[:, None]).any()
    # The query's exact duplicates tie with it at distance 0 and must survive: dropping "the first
    # hit" instead of the query's own id would lose one of them whenever faiss ranks it first.
    for q in range(len(keys)):
        twins = {3 * (q // 3) + j for j in range(3)} - {q}
        assert twins <= set(ids[q].tolist())


def test_self_exclusion_when_search_misses_the_query() -> None:
    class FixedIndex:
        def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            d = np.tile(np.arange(k, dtype=np.float32), (len(x), 1))
            i = np.tile(np.arange(100, 100 + k), (len(x), 1))
            i[0, 2] = 0  # query 0 finds itself at rank 2; query 1 does not find itself
            return d, i

    dist, ids = search_excluding_self(FixedIndex(), np.zeros((2, 4)), np.array([0, 1]), k=3)
    assert ids[0].tolist() == [100, 101, 103]
    assert ids[1].tolist() == [100, 101, 102]  # the (k+1)-th hit is the one dropped
    assert dist[1].tolist() == [0.0, 1.0, 2.0]


def test_ivfpq_path_runs_and_finds_neighbours(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(40, 32))
    keys = (centres[rng.integers(0, 40, 6000)] + rng.normal(size=(6000, 32))).astype(np.float16)
    values = rng.integers(0, 50, 6000).astype(np.int32)
    index, info = build_index(keys, IndexConfig(kind="ivfpq", nlist=32, code_size=8, nprobe=8),
                              progress=False)
    assert isinstance(index, faiss.IndexIVFPQ) and info["nlist"] == 32 and index.nprobe == 8
    exact = faiss.IndexFlatL2(32)
    exact.add(keys.astype(np.float32))
    q = np.arange(0, 6000, 30)
    _, approx_ids = search_excluding_self(index, keys[q], q, k=10)
    _, exact_ids = search_excluding_self(exact, keys[q], q, k=10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx_ids, exact_ids, strict=True)])
    assert recall > 0.3, recall  # far above chance (10/6000)

    tg = build_targets(index, keys, values, tmp_path / "targets", k=16, temperature=10.0, batch_size=700,
                       progress=False)
    assert len(tg) == 6000 and tg.meta["k"] == 16
    sums = np.add.reduceat(tg.probs.astype(np.float64), tg.offsets[:-1])
    np.testing.assert_allclose(sums, 1.0, atol=5e-3)
    assert set(np.unique(tg.token_ids)) <= set(values.tolist())
    ids, probs = tg.padded(np.array([0, 5, 5999]))
    assert ids.shape[1] <= 16 and np.allclose(probs.sum(1), 1.0)


@pytest.mark.parametrize("which", ["base", "llama_base", "mem_qwen_padded"])
def test_hook_captures_the_last_mlp_input(zoo, which: str) -> None:
    model = load_causal_lm(getattr(zoo, which))
    norm = (model.transformer.h[-1].ln_2 if which == "base"
            else model.model.layers[-1].post_attention_layernorm)
    seen = {}
    handle = norm.register_forward_hook(lambda _m, _i, out: seen.update(ref=out.detach()))
    ids = torch.randint(0, 300, (2, 11))
    with capture_mlp_input(model) as capture, torch.no_grad():
        model(input_ids=ids)
        got = capture.take()
    handle.remove()
    assert last_mlp(model) is (model.transformer.h[-1].mlp if which == "base" else model.model.layers[-1].mlp)
    torch.testing.assert_close(got, seen["ref"], rtol=0, atol=0)


def test_datastore_keys_and_values_line_up(zoo, tmp_path: Path) -> None:
    model = load_causal_lm(zoo.llama_base)
    tokens = np.random.default_rng(0).integers(0, 300, 150).astype(np.int32)
    ds = build_datastore(model, tokens, tmp_path / "one", context=256, stride=128, progress=False)
    with capture_mlp_input(model) as capture, torch.no_grad():
        model(input_ids=torch.as_tensor(tokens[None], dtype=torch.long))
        full = capture.take()[0]  # [150, H]
    assert ds.size == 149 and np.array_equal(ds.values(), tokens[1:])
    np.testing.assert_array_equal(ds.keys(), full[:-1].to(torch.float16).numpy())
    # With short windows every position still gets exactly one key, never a zero row.
    windowed = build_datastore(model, tokens, tmp_path / "win", context=32, stride=16, batch_size=3,
                               progress=False)
    keys = windowed.keys()
    assert keys.shape == (149, model.config.hidden_size) and (np.abs(keys).sum(1) > 0).all()
    with pytest.raises(ValueError, match="stride"):  # windows that do not overlap would leave zero rows
        build_datastore(model, tokens, tmp_path / "gap", context=32, stride=32, progress=False)
    # The first window sees the same prefix as the single long window (kernels may round differently).
    np.testing.assert_allclose(keys[:31].astype(np.float32), ds.keys()[:31].astype(np.float32),
                               rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="module")
def small_targets(env: dict[str, Path]) -> tuple[np.ndarray, SparseTargets]:
    tok = AutoTokenizer.from_pretrained(env["base"])
    tokens, _ = tokenize_corpus(tok, env["train"], max_tokens=3000, progress=False)
    ds = build_datastore(load_causal_lm(env["base"]), tokens, env["root"] / "small_ds", context=128,
                         stride=64, progress=False)
    index, _ = build_index(ds.keys(), IndexConfig(kind="flat"), progress=False)
    tg = build_targets(index, ds.keys(), ds.values(), env["root"] / "small_tg", k=16, progress=False)
    return np.asarray(Datastore.open(ds.path).tokens()), tg


def test_resume_reproduces_uninterrupted_training(env: dict[str, Path], small_targets,
                                                  tmp_path: Path) -> None:
    tokens, targets = small_targets
    tok = AutoTokenizer.from_pretrained(env["base"])
    # A GPT-2 memory has dropout, so an exact match also proves the RNG state is restored.
    init = build_model(tmp_path / "init", tok, "gpt2", hidden=32, layers=2, seed=7)
    config = TrainConfig(seq_len=32, batch_size=4, grad_accum=2, max_steps=6, lr=2e-3, warmup=2, save_every=0)
    full = train(config, tmp_path / "full", tok, tokens, targets, init_from=init, progress=False)
    part = train(config, tmp_path / "part", tok, tokens, targets, init_from=init, stop_after=3,
                 progress=False)
    assert not part.finished and part.steps_done == 3 and part.losses == full.losses[:3]
    assert (tmp_path / "part" / "checkpoint" / "trainer_state.json").is_file()
    assert not (tmp_path / "part" / "model.safetensors").exists()
    resumed = train(config, tmp_path / "part", tok, tokens, targets, init_from=init, resume=True,
                    progress=False)
    assert resumed.finished and resumed.steps_done == 6
    assert resumed.losses == full.losses  # the same loss at every step, bit for bit
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "part").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A checkpoint from other settings is refused rather than silently mixed in.
    train(config, tmp_path / "other", tok, tokens, targets, init_from=init, stop_after=2, progress=False)
    with pytest.raises(ValueError, match="different training run"):
        train(TrainConfig(**{**config.__dict__, "lr": 1e-3}), tmp_path / "other", tok, tokens, targets,
              init_from=init, resume=True, progress=False)


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["memory", "datastore", "--base", str(tmp_path / "nope"),
               "--corpus", str(tmp_path / "none.txt"), "--out", str(tmp_path / "ds"), "--quiet"])
    assert rc == 2
    assert "memdec memory: error:" in capsys.readouterr().err


def test_tokenizer_command(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.txt", 50, seed=3)
    assert main(["memory", "tokenizer", "--corpus", str(corpus), "--out", str(tmp_path / "tok"),
                 "--vocab-size", "300", "--quiet"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 300 and tok.eos_token == "<|endoftext|>"
    text = "Patients with kelitosis were treated with zorvamab."
    assert tok.decode(tok(text)["input_ids"]) == text


def test_stage_commands_one_by_one(env: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    """datastore → targets → train → eval as separate commands, the way a user steps through them."""
    ds, tg, mem = tmp_path / "ds", tmp_path / "tg", tmp_path / "mem"
    common = ["--quiet"]
    assert main(["memory", "datastore", "--base", str(env["base"]), "--corpus", str(env["train"]),
                 "--out", str(ds), "--max-tokens", "2500", "--context", "64", "--index", "flat",
                 *common]) == 0
    assert Datastore.open(ds).size == 2499 and (ds / "index.faiss").is_file()
    assert main(["memory", "targets", "--datastore", str(ds), "--out", str(tg), "--k", "8", *common]) == 0
    assert len(SparseTargets.open(tg)) == 2499
    assert main(["memory", "train", "--base", str(env["base"]), "--datastore", str(ds), "--targets", str(tg),
                 "--out", str(mem), "--name", "steps", "--domain", "synthetic", *SMALL_MODEL,
                 "--arch", "qwen2", "--seq-len", "32", "--max-steps", "4", *common]) == 0
    assert not (mem / "checkpoint").exists()  # dropped once training finished
    assert read_manifest(mem).training["steps"] == 4
    assert main(["memory", "eval", "--base", str(env["base"]), "--memory", str(mem),
                 "--valid", str(env["valid"]), "--eval-max-tokens", "600", "--alphas", "0.3,0.6",
                 *common]) == 0
    report = json.loads((mem / "evaluation.json").read_text())
    assert report["tokens_scored"] == 599 and [r["alpha"] for r in report["mixture"]] == [0.3, 0.6]
    assert read_manifest(mem).alpha == report["best_alpha"] and report["alpha_from"] == "in-source"
    assert "in-source" in capsys.readouterr().out


# -- sources held out of the datastore (memories/sources.py) and cross-source evaluation
# (memories/crosseval.py)


def _numbered(source: str, n: int) -> list[str]:
    return [f"{source} document {i}" for i in range(n)]


def test_holdout_split_by_line_ranges(tmp_path: Path) -> None:
    """A sources.json-style file of line ranges: the held-out source never reaches the datastore text, its
    held-out text is its own valid lines, and the kept sources alternate document by document."""
    data = tmp_path / "data"
    (data / "dom").mkdir(parents=True)
    train = _numbered("a", 5) + _numbered("b", 2) + _numbered("c", 3)
    valid = _numbered("va", 2) + _numbered("vb", 1) + _numbered("vc", 2)
    (data / "dom" / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (data / "dom" / "valid.txt").write_text("\n".join(valid) + "\n", encoding="utf-8")
    spec = {"dom": {
        "train.txt": [{"source": "a", "lines": [0, 5]}, {"source": "b", "lines": [5, 7]},
                      {"source": "c", "lines": [7, 10]}],
        "valid.txt": [{"source": "a", "lines": [0, 2]}, {"source": "b", "lines": [2, 3]},
                      {"source": "c", "lines": [3, 5]}],
    }}
    (data / "sources.json").write_text(json.dumps(spec), encoding="utf-8")

    split = domain_holdout(data, "dom", "a", tmp_path / "split")
    assert split.kept == ("b", "c") and split.datastore_docs == {"b": 2, "c": 3}
    assert split.datastore.read_text().splitlines() == [
        "b document 0", "c document 0", "b document 1", "c document 1", "c document 2"]
    assert split.heldout["a"].read_text().splitlines() == ["va document 0", "va document 1"]
    assert {k: p.read_text().splitlines() for k, p in split.in_source.items()} == {
        "b": ["vb document 0"], "c": ["vc document 0", "vc document 1"]}

    # The same split from a directory corpus, one file per source.
    for part, lines in (("train", train), ("valid", valid)):
        for name, (a, b) in {"a": (0, 5), "b": (5, 7), "c": (7, 10)}.items():
            rng = (a, b) if part == "train" else {"a": (0, 2), "b": (2, 3), "c": (3, 5)}[name]
            (tmp_path / part).mkdir(exist_ok=True)
            (tmp_path / part / f"{name}.txt").write_text("\n".join(lines[rng[0]:rng[1]]) + "\n",
                                                         encoding="utf-8")
    by_file = holdout_split(tmp_path / "train", tmp_path / "valid", ["a"], tmp_path / "split2")
    assert by_file.datastore.read_text() == split.datastore.read_text()
    assert by_file.heldout["a"].read_text() == split.heldout["a"].read_text()

    # Without held-out text for it, a held-out source is judged on its own corpus lines.
    no_valid = holdout_split(tmp_path / "train", None, ["b"], tmp_path / "split3")
    assert (no_valid.heldout["b"].read_text().splitlines() == ["b document 0", "b document 1"]
            and not no_valid.in_source)
    with pytest.raises(CorpusError, match="unknown source"):
        domain_holdout(data, "dom", "zzz", tmp_path / "x")
    with pytest.raises(CorpusError, match="nothing is left"):
        holdout_split(tmp_path / "train", None, ["a", "b", "c"], tmp_path / "x")


def _report(base: float, memory: float, curve: dict[float, float], tokens: int = 100) -> dict:
    best = min(curve, key=lambda a: curve[a])
    return {"tokens_scored": tokens, "base_ppl": base, "memory_ppl": memory, "context": 64, "stride": 32,
            "mixture": [{"alpha": a, "ppl": p} for a, p in curve.items()], "best_alpha": best,
            "best_ppl": curve[best], "improvement_pct": 100 * (base - curve[best]) / base, "seconds": 1.0}


def test_alpha_comes_from_cross_source_text_and_disagreement_warns() -> None:
    """A memory that memorised its sources: in-source text wants α = 0.9, the held-out sources want 0.3."""
    inside = _report(500, 200, {0.3: 400, 0.6: 300, 0.9: 250})
    cross_a = _report(800, 1600, {0.3: 700, 0.6: 780, 0.9: 1100}, tokens=50)
    cross_b = _report(200, 300, {0.3: 190, 0.6: 195, 0.9: 260}, tokens=500)
    texts = [{"label": "mine", "kind": IN_SOURCE, **inside}, {"label": "a", "kind": CROSS_SOURCE, **cross_a},
             {"label": "b", "kind": CROSS_SOURCE, **cross_b}]
    report = combine(texts)
    assert report["alpha"] == 0.3 and report["alpha_from"] == CROSS_SOURCE
    # Pooled over sources as a geometric mean: each source weighs the same whatever its token count.
    assert report["best_ppl"] == pytest.approx(math.sqrt(700 * 190))
    assert report["base_ppl"] == pytest.approx(400.0) and report["tokens_scored"] == 550
    assert report["groups"][IN_SOURCE]["best_alpha"] == 0.9
    assert report["ppl_at_alpha"] == {"mine": 400, "a": 700, "b": 190}
    joined = " ".join(report["warnings"])
    assert "best α differs" in joined and "memorised" in joined and "worse than the base" not in joined

    # α fixed elsewhere (e.g. by leave-one-source-out builds): a cross-source text made worse is named.
    fixed = combine(texts, fixed_alpha=0.9)
    assert fixed["alpha"] == 0.9 and fixed["alpha_from"] == "fixed"
    assert any(w.startswith("a (cross-source): the mixture at α = 0.90 is worse") for w in fixed["warnings"])
    assert any(w.startswith("b (cross-source)") for w in fixed["warnings"])

    # Only in-source text: α is read off it, and the report says so.
    alone = combine([texts[0]])
    assert alone["alpha"] == 0.9 and alone["alpha_from"] == IN_SOURCE
    assert any("no cross-source text" in w for w in alone["warnings"])


def test_alpha_command_pools_leave_one_source_out_builds(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Two builds, each holding one source out: alone they want α = 0.3 and 0.9; pooled (geometric mean per α)
    0.6 wins, which neither build's best α would have given."""
    fold_a = combine([{"label": "a", "kind": CROSS_SOURCE, **_report(100, 90, {0.3: 50, 0.6: 52, 0.9: 200})}])
    fold_b = combine([{"label": "b", "kind": CROSS_SOURCE, **_report(100, 90, {0.3: 200, 0.6: 52, 0.9: 50})}])
    paths = []
    for i, rep in enumerate((fold_a, fold_b)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(rep), encoding="utf-8")
    assert main(["memory", "alpha", *map(str, paths)]) == 0
    assert capsys.readouterr().out.strip() == "0.60"
    in_source_only = tmp_path / "in.json"
    in_source_only.write_text(json.dumps(combine([{"label": "c", "kind": IN_SOURCE,
                                                   **_report(1, 1, {0.5: 1})}])))
    assert main(["memory", "alpha", str(paths[0]), str(in_source_only)]) == 2
    assert "--holdout-source" in capsys.readouterr().err


def test_build_holds_a_source_out_and_chooses_alpha_on_it(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two sources of one domain: templated facts (memorisable) and biomedical prose. A memory built on the
    facts with the prose held out: the datastore holds only the facts, α is the prose's best α, and the
    report has both curves."""
    corpus, valid = tmp_path / "train", tmp_path / "valid"
    write_corpus(corpus / "facts.txt", 120, seed=1)
    write_corpus(valid / "facts.txt", 25, seed=2)
    for folder, seed, chars in ((corpus, 1, 40_000), (valid, 2, 6_000)):
        (folder / "prose.txt").write_text(sample_text("biomedical", chars, seed=seed) + "\n",
                                          encoding="utf-8")
    out = tmp_path / "memory"
    assert main([
        "memory", "build", "--base", str(env["base"]), "--corpus", str(corpus), "--valid", str(valid),
        "--sources", "files", "--holdout-source", "prose", "--out", str(out), "--name", "facts", "--k", "32",
        "--context", "128", *SMALL_MODEL, "--seq-len", "64", "--train-batch-size", "8", "--epochs", "2",
        "--lr", "3e-3", "--eval-max-tokens", "1500", "--quiet",
    ]) == 0
    printed = capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(env["base"])
    facts_tokens, _ = tokenize_corpus(tok, corpus / "facts.txt", progress=False)
    manifest = read_manifest(out)
    assert manifest.corpus["datastore_entries"] == len(facts_tokens) - 1  # the prose never reached it
    assert manifest.corpus["holdout_sources"] == ["prose"]

    report = json.loads((out / "evaluation.json").read_text())
    by_label = {t["label"]: t for t in report["texts"]}
    assert {k: t["kind"] for k, t in by_label.items()} == {"prose": CROSS_SOURCE, "facts": IN_SOURCE}
    assert (report["alpha_from"] == CROSS_SOURCE
            and manifest.alpha == report["alpha"] == by_label["prose"]["best_alpha"])
    # The held-out numbers agree with an independent sliding-window computation over the prose text.
    base = AutoModelForCausalLM.from_pretrained(env["base"], use_safetensors=True).eval()
    memory = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    prose, _ = tokenize_corpus(tok, valid / "prose.txt", max_tokens=1500, progress=False)
    ids = torch.as_tensor(prose, dtype=torch.long)
    b = _reference_logprobs(base, ids, report["context"], report["stride"], len(tok))
    m = _reference_logprobs(memory, ids, report["context"], report["stride"], len(tok))
    assert math.exp(-b.double().mean()) == pytest.approx(by_label["prose"]["base_ppl"], rel=1e-4)
    assert math.exp(-m.double().mean()) == pytest.approx(by_label["prose"]["memory_ppl"], rel=1e-4)
    # Its own templated source gains more than the prose it never saw; both lines are printed.
    assert by_label["facts"]["improvement_pct"] > by_label["prose"]["improvement_pct"]
    assert "prose" in printed and "cross-source" in printed and "facts" in printed and "in-source" in printed
    assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
