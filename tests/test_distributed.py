"""The toolkit's stages under torchrun (two gloo processes) against the same build in one process.

The reference is the one-process build of the same command: a datastore, index and targets that must be
byte-equal, training losses within 1e-5 at the same global batch (3 sequences: shares of 2 and 1, so the
loss weighting matters) with gradient accumulation (DDP's no_sync path). A rank SIGKILLed mid-datastore
must fail the launch with torchrun's summary naming it, and a re-run must finish only the unfinished
shards to the same bytes, at the same world size or another; a training run stopped at world size 2 must
resume in one process onto the one-process trajectory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from safetensors.numpy import load_file

from memories.cli import main
from memories.config import IndexConfig
from memories.distributed import KILL_ENV
from memories.knn import build_index, build_index_sharded, load_index
from testkit.models import build_model, build_tokenizer
from testkit.text import write_corpus

REPO = Path(__file__).resolve().parents[1]
MEMORY = ["--hidden-size", "32", "--layers", "1", "--heads", "2", "--max-len", "64"]
# ivfpq: the harder index to reproduce (a trained quantizer); 2 windows per forward and 64-query searches
# make many shards of each stage out of a tiny corpus.
STAGES = ["--context", "64", "--batch-size", "2", "--index", "ivfpq", "--nlist", "8", "--code-size", "8",
          "--k", "8", "--search-batch", "64"]  # fmt: skip  # flag/value pairs on one line
TRAIN = ["--seq-len", "32", "--train-batch-size", "3", "--grad-accum", "2", "--max-steps", "4",
         "--lr", "3e-3"]  # fmt: skip  # flag/value pairs on one line
FILES = ["datastore/tokens.npy", "datastore/values.npy", "datastore/keys.npy", "index/index.faiss",
         "targets/offsets.npy", "targets/token_ids.npy", "targets/probs.npy"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random-init Llama base, a small domain corpus and the one-process build every test compares with."""
    root = tmp_path_factory.mktemp("distributed")
    tok = build_tokenizer(root / "tok")
    base = build_model(root / "base", tok, "llama", hidden=32, layers=2, seed=1, max_len=256)
    corpus = write_corpus(root / "train.txt", 60, seed=1)
    valid = write_corpus(root / "valid.txt", 8, seed=2)
    paths = {"root": root, "base": base, "corpus": corpus, "valid": valid, "one": root / "one"}
    assert main([*_build(paths, paths["one"])]) == 0
    return paths


def _build(paths: dict[str, Path], out: Path) -> list[str]:
    return ["memory", "build", "--base", str(paths["base"]), "--corpus", str(paths["corpus"]),
            "--out", str(out), "--valid", str(paths["valid"]), "--alphas", "0.5", "--eval-max-tokens", "300",
            "--name", "tiny", *STAGES, *MEMORY, *TRAIN,
            "--quiet"]  # fmt: skip  # flag/value pairs on one line


def _torchrun(args: list[str], env: dict[str, str] | None = None,
              launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free rendezvous port), two processes running `memdec memory …` from this
    checkout."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *launcher,
           "-m", "memories.cli", *args]  # fmt: skip  # flag/value pairs on one line
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)


def _same_files(a: Path, b: Path) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _losses(memory: Path) -> np.ndarray:
    return np.array(json.loads((memory / "training_log.json").read_text())["loss"])


def test_build_on_two_processes_equals_one(tiny: dict[str, Path]) -> None:
    two = tiny["root"] / "two"
    run = _torchrun(_build(tiny, two))
    assert run.returncode == 0, run.stderr[-3000:]
    # Rank 0 alone reports: each stage line once; it evaluates after the others have ended.
    for stage in ("datastore", "index", "targets", "train", "eval"):
        assert run.stdout.count(f"[memdec] {stage}: running") == 1, run.stdout
    one_work, two_work = Path(f"{tiny['one']}.work"), Path(f"{two}.work")
    _same_files(one_work, two_work)
    # The merged index searches exactly as the one-process one (the bytes are equal; searched to be sure).
    queries = np.load(one_work / "datastore" / "keys.npy")[::7].astype(np.float32)
    (ia, _), (ib, _) = load_index(one_work / "index"), load_index(two_work / "index")
    da, na = ia.search(queries, 8)
    db, nb = ib.search(queries, 8)
    assert np.array_equal(na, nb) and np.array_equal(da, db)
    # The same trajectory within float summation order, and the same final weights.
    la, lb = _losses(tiny["one"]), _losses(two)
    assert len(la) == len(lb) == 4
    np.testing.assert_allclose(lb, la, rtol=0, atol=1e-5)
    wa, wb = load_file(tiny["one"] / "model.safetensors"), load_file(two / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=0, atol=1e-5)
    ea, eb = (json.loads((d / "evaluation.json").read_text()) for d in (tiny["one"], two))
    assert eb["base_ppl"] == ea["base_ppl"]
    assert eb["memory_ppl"] == pytest.approx(ea["memory_ppl"], rel=1e-4)
    # No shard bookkeeping is left behind once a stage is complete.
    assert not list(two_work.rglob("*.shards"))


def test_killed_rank_stops_the_launch_and_a_rerun_finishes_it(tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "killed"
    # torchrun looks at its workers every 10 s here (0.1 s by default), so rank 0 meets its peer's absence
    # itself, at the barrier after its own shards, before torchrun would stop it.
    killed = _torchrun(
        _build(tiny, out), env={KILL_ENV: "datastore:1:2"}, launcher=("--monitor-interval", "10")
    )
    assert killed.returncode != 0
    # torchrun's summary: the root cause is rank 1, killed by SIGKILL; rank 0 says what it was waiting for.
    root_cause = killed.stderr[killed.stderr.index("Root Cause") :]
    named = re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", root_cause)
    assert named, killed.stderr[-2000:]
    assert (
        "memdec memory: error: rank 0 of 2: the other ranks went away while computing datastore keys"
        in killed.stderr
    )
    shards = Path(f"{out}.work") / "datastore" / "datastore.shards"
    done = len([p for p in shards.glob("*.json") if p.name != "plan.json"])
    assert done >= 2  # rank 1's two shards at least, and rank 0's until it was stopped
    assert not (Path(f"{out}.work") / "datastore" / "datastore.json").exists()

    rerun = _torchrun(_build(tiny, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    match = re.search(r"datastore: (\d+) of (\d+) shards done by an earlier run", rerun.stdout)
    assert match and int(match[1]) == done and int(match[2]) > done, rerun.stdout
    _same_files(Path(f"{tiny['one']}.work"), Path(f"{out}.work"))
    np.testing.assert_allclose(_losses(out), _losses(tiny["one"]), rtol=0, atol=1e-5)


def test_targets_killed_on_two_processes_finish_on_one(
    tiny: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    """Shard boundaries do not depend on the world size: a targets stage cut short on two processes is
    finished by one, which reuses the finished shards rather than searching them again (one of them is
    overwritten here, and its overwritten rows are what comes out) and computes the rest."""
    out = tiny["root"] / "targets-killed"
    killed = _torchrun(_build(tiny, out), env={KILL_ENV: "targets:1:3"})
    assert killed.returncode != 0 and "datastore: running" in killed.stdout
    shards = Path(f"{out}.work") / "targets" / "targets.shards"
    finished = sorted(p for p in shards.glob("*.json") if p.name != "plan.json")
    assert len(finished) >= 3
    reused = json.loads(finished[-1].read_text())  # {"rows": [a, b], "nnz": …}
    probs_file = finished[-1].with_suffix(".prob")
    probs_file.write_bytes(np.full(reused["nnz"], 0.5, np.float16).tobytes())

    assert main(_build(tiny, out)) == 0  # one process, no torchrun
    printed = capsys.readouterr().out
    assert "datastore: cached" in printed and "index: cached" in printed
    match = re.search(r"targets: (\d+) of (\d+) shards done by an earlier run", printed)
    assert match and int(match[1]) == len(finished) and int(match[2]) > len(finished), printed
    ref, got = (Path(f"{d}.work") / "targets" for d in (tiny["one"], out))
    offsets = np.load(ref / "offsets.npy")
    lo, hi = offsets[reused["rows"][0]], offsets[reused["rows"][1]]
    want = np.load(ref / "probs.npy").copy()
    want[lo:hi] = 0.5  # the reused shard as overwritten; every other row searched again or kept, unchanged
    assert hi > lo and np.array_equal(np.load(got / "probs.npy"), want)
    for name in ("offsets.npy", "token_ids.npy"):
        assert (ref / name).read_bytes() == (got / name).read_bytes()


def test_training_stopped_on_two_processes_resumes_on_one(tiny: dict[str, Path]) -> None:
    work = Path(f"{tiny['one']}.work")
    out = tiny["root"] / "resumed"
    train = ["memory", "train", "--base", str(tiny["base"]), "--datastore", str(work / "datastore"),
             "--targets", str(work / "targets"), "--out", str(out), *MEMORY, *TRAIN,
             "--quiet"]  # fmt: skip  # flag/value pairs on one line
    part = _torchrun([*train, "--stop-after", "2"])
    assert part.returncode == 0, part.stderr[-3000:]
    assert (out / "checkpoint" / "trainer_state.json").is_file() and not (out / "model.safetensors").exists()
    assert main([*train, "--resume"]) == 0  # one process, no torchrun
    np.testing.assert_allclose(_losses(out), _losses(tiny["one"]), rtol=0, atol=1e-5)


def test_datastore_command_on_two_processes_equals_one(tiny: dict[str, Path]) -> None:
    """`memory datastore` on its own, with its flat index beside the keys (index shards merged by rank 0)."""
    args = ["memory", "datastore", "--base", str(tiny["base"]), "--corpus", str(tiny["corpus"]),
            "--context", "48", "--batch-size", "3", "--index", "flat",
            "--quiet"]  # fmt: skip  # flag/value pairs on one line
    one, two = tiny["root"] / "ds-one", tiny["root"] / "ds-two"
    assert main([*args, "--out", str(one)]) == 0
    run = _torchrun([*args, "--out", str(two)])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("== datastore") == 1  # one summary, rank 0's
    for name in ("keys.npy", "values.npy", "tokens.npy", "index.faiss"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_sharded_index_equals_one_built_at_once(kind: str, tmp_path: Path) -> None:
    """The shard-and-merge path (here in one process, 64 shards) gives the very index `build_index` does."""
    keys = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float16)
    config = IndexConfig(kind=kind, nlist=8, code_size=4)
    whole, _ = build_index(keys, config, progress=False)
    info = build_index_sharded(keys, config, tmp_path, {"keys": "test"}, progress=False)
    merged, _ = load_index(tmp_path)
    assert info["num_entries"] == merged.ntotal == 3000
    assert np.array_equal(faiss.serialize_index(whole), faiss.serialize_index(merged))


def test_one_process_commands_refuse_torchrun(
    tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rc = main(["memory", "eval", "--base", str(tiny["base"]), "--memory", str(tiny["one"]),
               "--valid", str(tiny["corpus"])])  # fmt: skip  # flag/value pairs on one line
    assert rc == 1
    assert "memdec memory eval runs in one process" in capsys.readouterr().err
