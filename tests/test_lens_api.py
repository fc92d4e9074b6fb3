"""What the memory lens needs from the public API, in process (real app, real engine, tiny models):
`/v1/perplexity`'s per-token log-probs (`logprobs`) and scoring in parts (`first_window`, `max_windows`),
checked against plain HF forwards; and the page's own routes (`/`, `/lens`, its files, their CSP)."""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch

from memories.mixing import mix_scalar
from memories.perplexity import sliding_windows
from server.config import MemorySpec, ModelConfig, ServerConfig
from server.validation import MAX_TOKEN_LOGPROBS
from testkit.text import sample_text
from tests.api_harness import InProcessServer, assert_error
from tests.test_api_errors import FUZZ_VALUES

REPO = Path(__file__).resolve().parents[1]
TEXT = "The court held that the statute applies to the contract, and the patient was given a dose."
UNICODE = "Naïve café — 5 µg/mL at 37 °C; ångström ≈ 0.1 nm. 患者 ✓"


@pytest.fixture(scope="module")
def server(zoo):
    config = ServerConfig(
        model=ModelConfig(str(zoo.base)),
        memories=(MemorySpec("med", str(zoo.mem_llama)), MemorySpec("law", str(zoo.mem_qwen_padded))),
        served_model_name="tiny-base",
    )
    with InProcessServer(config) as s:
        yield s


def perplexity(server, body):
    r = server.post("/v1/perplexity", body)
    assert r.status_code == 200, r.text
    return r.json()


@torch.no_grad()
def reference_logprobs(model, ids: list[int], ctx: int, stride: int, vocab: int) -> dict[int, torch.Tensor]:
    """position -> log p(. | its window's left context) [V], from plain HF forwards over each window."""
    out = {}
    for w in sliding_windows(len(ids), ctx, stride):
        lp = torch.log_softmax(model(torch.tensor([ids[w.begin : w.end]])).logits[0, :, :vocab].double(), -1)
        for t in range(w.score_from, w.end):
            out[t] = lp[t - w.begin - 1]
    return out


# -- per-token log-probs ------------------------------------------------------------------------------


def test_token_logprobs_match_hf_and_the_totals(server, ref):
    ids = ref.encode(TEXT)
    out = perplexity(server, {"input": TEXT, "memory": "med", "alpha": [0.25, 0.75], "logprobs": 3})
    doc = out["data"][0]
    lp = doc["logprobs"]
    assert doc["num_windows"] == 1 and lp["offset"] == 0
    assert lp["token_ids"] == ids and "".join(lp["tokens"]) == TEXT
    assert (lp["base"][0] is None and lp["memory"][0] is None and lp["mixed"][0] is None
            and lp["top_logprobs"][0] is None)
    base_ref = reference_logprobs(ref.base, ids, 512, 256, ref.vocab)
    mem_ref = reference_logprobs(ref.med, ids, 512, 256, ref.vocab)
    for t in range(1, len(ids)):
        b, m = float(base_ref[t][ids[t]]), float(mem_ref[t][ids[t]])
        assert lp["base"][t] == pytest.approx(b, abs=1e-4)
        assert lp["memory"][t] == pytest.approx(m, abs=1e-4)
        assert lp["mixed"][t] == pytest.approx(mix_scalar(b, m, 0.25), abs=1e-4)  # the first alpha
        top = lp["top_logprobs"][t]
        # Each model's top 3, once each, best first under the mixture, with both models' values.
        expected = set(base_ref[t].topk(3).indices.tolist()) | set(mem_ref[t].topk(3).indices.tolist())
        assert {a["token_id"] for a in top} == expected and len(top) == len(expected)
        assert [a["mixed"] for a in top] == sorted((a["mixed"] for a in top), reverse=True)
        for a in top:
            ab, am = float(base_ref[t][a["token_id"]]), float(mem_ref[t][a["token_id"]])
            assert (a["base"], a["memory"]) == (pytest.approx(ab, abs=1e-4), pytest.approx(am, abs=1e-4))
            assert a["mixed"] == pytest.approx(mix_scalar(ab, am, 0.25), abs=1e-4)
            assert a["token"] == ref.tok.decode([a["token_id"]])
    n = doc["num_tokens"]
    assert -sum(lp["base"][1:]) / n == pytest.approx(doc["base_nll"], rel=1e-6)
    assert -sum(lp["memory"][1:]) / n == pytest.approx(doc["memory_nll"], rel=1e-6)
    assert -sum(lp["mixed"][1:]) / n == pytest.approx(doc["nll"], rel=1e-6)
    assert out["overall"].get("logprobs") is None  # per document only


def test_per_token_values_agree_with_completion_echo(server):
    """The same numbers through an independent path: /v1/completions' prompt log-probs (echo)."""
    doc = perplexity(server, {"input": TEXT, "memory": "law", "logprobs": 0})["data"][0]["logprobs"]
    assert doc["top_logprobs"] is None
    for memory, alpha, key in ((None, None, "base"), ("law", 1.0, "memory"), ("law", 0.4, "mixed")):
        body = {"prompt": TEXT, "echo": True, "max_tokens": 0, "logprobs": 0, "memory": memory}
        echo = server.complete(**body, **({"alpha": alpha} if alpha is not None else {}))
        assert echo["choices"][0]["logprobs"]["token_logprobs"] == [
            None if v is None else pytest.approx(v, abs=2e-4) for v in doc[key]
        ], key


def test_base_alone_has_no_memory_columns(server, ref):
    lp = perplexity(server, {"input": TEXT, "logprobs": 2})["data"][0]["logprobs"]
    assert lp["memory"] is None and lp["mixed"] is None
    for top in lp["top_logprobs"][1:]:
        assert len(top) == 2 and all(set(a) == {"token", "token_id", "base"} for a in top)
        assert top[0]["base"] >= top[1]["base"]


def test_without_logprobs_the_answer_is_as_before(server):
    doc = perplexity(server, {"input": TEXT, "memory": "med"})["data"][0]
    assert doc["logprobs"] is None and doc["num_windows"] == 1


# -- scoring in parts ---------------------------------------------------------------------------------


def test_parts_concatenate_to_the_whole(server, ref):
    text = sample_text("legal", 2500)
    ids = ref.encode(text)
    windows = list(sliding_windows(len(ids), 64, 24))
    body = {"input": text, "memory": "med", "context_length": 64, "stride": 24, "logprobs": 2}
    whole = perplexity(server, body)["data"][0]
    assert whole["num_windows"] == len(windows) > 10
    parts, first = [], 0
    while first < len(windows):
        part = perplexity(server, {**body, "first_window": first, "max_windows": 4})["data"][0]
        assert part["num_windows"] == len(windows)
        assert part["logprobs"]["offset"] == (0 if first == 0 else windows[first].score_from)
        assert part["num_tokens"] == sum(w.num_scored for w in windows[first : first + 4])
        parts.append(part)
        first += 4
    joined = {key: [v for p in parts for v in p["logprobs"][key]]
              for key in whole["logprobs"] if key != "offset"}
    assert joined["token_ids"] == whole["logprobs"]["token_ids"] == ids
    assert joined["tokens"] == whole["logprobs"]["tokens"] and "".join(joined["tokens"]) == text
    assert ([a is None for a in joined["top_logprobs"]]
            == [a is None for a in whole["logprobs"]["top_logprobs"]])
    for key in ("base", "memory", "mixed"):
        assert joined[key][0] is None
        assert joined[key][1:] == pytest.approx(whole["logprobs"][key][1:], abs=1e-4)
    for key in ("base_nll", "memory_nll", "nll"):
        total = sum(p[key] * p["num_tokens"] for p in parts)
        assert total / whole["num_tokens"] == pytest.approx(whole[key], rel=1e-5)


def test_token_text_rebuilds_text_with_split_characters(server, ref):
    ids = ref.encode(UNICODE)
    assert ref.tok.decode(ids) == UNICODE
    # The tiny tokenizer learned English only: multi-byte characters are split over byte tokens.
    assert any("\ufffd" in ref.tok.decode([i]) for i in ids)
    body = {"input": UNICODE, "context_length": 8, "stride": 3, "logprobs": 0}
    whole = perplexity(server, body)["data"][0]
    assert "".join(whole["logprobs"]["tokens"]) == UNICODE
    pieces = []
    for first in range(whole["num_windows"]):
        pieces += perplexity(server, {**body, "first_window": first,
                                      "max_windows": 1})["data"][0]["logprobs"]["tokens"]
    assert pieces == whole["logprobs"]["tokens"]


# -- errors -------------------------------------------------------------------------------------------


LENS_ERRORS = [
    ({"logprobs": 21}, "logprobs", "logprobs must be at most 20"),
    ({"logprobs": -1}, "logprobs", None),
    ({"logprobs": 1.5}, "logprobs", None),
    ({"first_window": -1}, "first_window", None),
    ({"first_window": 1}, "first_window", "it has 1 windows"),
    ({"first_window": 2**70}, "first_window", "past the end"),
    ({"max_windows": 0}, "max_windows", None),
    ({"first_window": "1"}, "first_window", None),
]


@pytest.mark.parametrize("extra,param,message", LENS_ERRORS)
def test_lens_fields_errors(server, extra, param, message):
    err = assert_error(server.post("/v1/perplexity", {"input": TEXT, "memory": "med", **extra}), 400, param)
    assert message is None or message in err["message"], err


def test_per_token_answers_are_bounded(server):
    ids = [5] * (MAX_TOKEN_LOGPROBS + 600)
    err = assert_error(server.post("/v1/perplexity", {"input": ids, "logprobs": 0}), 400, "logprobs")
    assert "score the text in parts" in err["message"]
    part = perplexity(server, {"input": ids, "logprobs": 0, "first_window": 3, "max_windows": 2})["data"][0]
    # windows 3 and 4 score 256 each
    assert part["num_tokens"] == 512 and part["logprobs"]["offset"] == 4 * 256
    assert perplexity(server, {"input": ids})["data"][0]["num_tokens"] == len(ids) - 1  # sums only: no bound


def test_fuzzed_lens_fields_never_give_5xx(server):
    for field in ("logprobs", "first_window", "max_windows"):
        for value in FUZZ_VALUES:
            body = {"input": TEXT, "memory": "med", field: value}
            r = server.post("/v1/perplexity", body)
            assert r.status_code < 500, (body, r.text)
            if r.status_code != 200:
                assert_error(r, r.status_code)
    assert server.serving.engine.is_alive


def test_schema_documents_the_lens_fields(server):
    spec = server.get("/openapi.json").json()
    body = spec["components"]["schemas"]["PerplexityRequestBody"]["properties"]
    assert {"logprobs", "first_window", "max_windows"} <= set(body)
    assert "PerplexityLogprobs" in spec["components"]["schemas"]
    assert "In parts" in spec["paths"]["/v1/perplexity"]["post"]["description"]
    assert not any(path in spec["paths"] for path in ("/", "/lens")), "the page is not an API endpoint"


# -- the page's routes --------------------------------------------------------------------------------


def _assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(lens/[^"]+)"', html)


def test_lens_page_and_its_files_are_served_with_a_strict_policy(server):
    page = server.get("/lens")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None, "no inline script"
    assert re.search(r"\s(on[a-z]+|style)=", html) is None, "no inline handlers or styles"
    pending, seen = _assets(html), set()
    while pending:  # the page's files and every module they import
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        r = server.get("/" + path)
        assert r.status_code == 200, path
        assert (r.headers["content-type"].split(";")[0]
                == {"js": "text/javascript", "css": "text/css"}[path.rsplit(".", 1)[1]])
        if path.endswith(".js"):
            code = r.text.replace('"http://www.w3.org/2000/svg"', "")  # SVG's namespace name, not a fetch
            assert "http://" not in code and "https://" not in code, f"{path} reaches outside the origin"
            pending += ["lens/" + m for m in re.findall(r'from "\./([^"]+)"', r.text)]
    assert {"lens/main.js", "lens/lens.css", "lens/api.js", "lens/mix.js"} <= seen
    assert_error(server.get("/lens/nope.js"), 404)
    assert_error(server.get("/lens/..%2Fapp.py"), 404)


def test_every_page_file_ships_in_the_package():
    """pyproject's package-data globs cover every file of server/lens (a wheel without them serves 404s)."""
    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    globs = re.findall(r'"([^"]+)"', re.search(r"^server = \[(.*?)\]", section, re.M).group(1))
    files = [p.relative_to(REPO / "server").as_posix() for p in (REPO / "server" / "lens").iterdir()]
    assert files and all(any(fnmatch(f, g) for g in globs) for f in files), (files, globs)


def test_home_links_to_the_lens(server):
    r = server.get("/")
    assert r.status_code == 200 and 'href="lens"' in r.text
    assert "content-security-policy" in r.headers

