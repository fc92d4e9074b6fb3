"""`"memory": "auto"`: the server scores the prompt under the base alone and under each candidate's mixture at
its default α and temperature, and continues with the lowest prompt NLL (the base wins ties; too-short prompts
run on the base). The choice is checked against an argmin computed here from full forwards of the plain HF
reference models; the chosen memory's tokens against a request that names it."""

from __future__ import annotations

import pytest
import torch

from server.api.auto import HEADER, MIN_AUTO_TOKENS
from tests.api_harness import assert_error

TEXTS = [
    ("The patient was given a dose of the drug and the court held that the statute "
     "applies to every case here."),
    "Once upon a time there was a little town by the sea where the fishermen sold their catch every morning.",
    ("The committee expects inflation to remain near two percent while the labour market "
     "stays tight this year."),
    ("In the trial, the defendant argued that the contract was void because the clause "
     "was never signed by him."),
]


@torch.no_grad()
def prompt_nll(ref, ids: list[int], memory, alpha: float, temperature: float) -> float:
    """Summed NLL of ids[1:] under alpha * softmax(memory / T) + (1 - alpha) * softmax(base), float64."""
    t = torch.tensor([ids])
    p = torch.softmax(ref.base(t).logits[0, :-1, : ref.vocab].double(), -1)
    if memory is not None:
        p = (1 - alpha) * p + alpha * torch.softmax(
            memory(t).logits[0, :-1, : ref.vocab].double() / temperature, -1
        )
    return -torch.log(p.gather(-1, t[0, 1:, None])).sum().item()


def expected_choice(med_law_server, ref, ids: list[int], candidates: list[str]) -> str | None:
    models = {"med": ref.med, "law": ref.law}
    best, best_nll = None, prompt_nll(ref, ids, None, 0.0, 1.0)
    for name in candidates:
        card = med_law_server.get(f"/v1/models/{name}").json()
        nll = prompt_nll(ref, ids, models[name], card["alpha"], card["temperature"])
        if nll < best_nll:
            best, best_nll = name, nll
    return best


def test_choice_is_the_argmin_and_tokens_match_the_named_memory(med_law_server, ref):
    outcomes = set()
    for text in TEXTS:
        ids = ref.encode(text)
        assert len(ids) - 1 >= MIN_AUTO_TOKENS
        for candidates in (None, ["med"], ["law"], ["law", "med"]):
            body = {"prompt": text, "max_tokens": 6, "temperature": 0, "memory": "auto"}
            if candidates is not None:
                body["memory_candidates"] = candidates
            r = med_law_server.post("/v1/completions", body)
            assert r.status_code == 200, r.text
            want = expected_choice(med_law_server, ref, ids,
                                   candidates if candidates is not None else ["med", "law"])
            got = r.json()
            assert got["memory"] == want, (text, candidates)
            assert r.headers[HEADER] == (want or "none")
            outcomes.add(want)
            alpha = med_law_server.get(f"/v1/models/{want}").json()["alpha"] if want else None
            assert got["alpha"] == alpha
            named = med_law_server.post("/v1/completions",
                                        {"prompt": text, "max_tokens": 6, "temperature": 0, "memory": want})
            assert named.json()["choices"][0]["text"] == got["choices"][0]["text"]
    assert len(outcomes) >= 2, outcomes  # the tiny models disagree: the choice is not a constant


def test_short_prompts_run_on_the_base_and_the_choice_is_counted(med_law_server):
    before = med_law_server.get("/metrics").text
    r = med_law_server.post("/v1/completions", {"prompt": "The court", "max_tokens": 2, "memory": "auto"})
    assert r.status_code == 200 and r.json()["memory"] is None and r.json()["alpha"] is None
    assert r.headers[HEADER] == "none"
    after = med_law_server.get("/metrics").text

    def count(body: str) -> float:
        line = next(x for x in body.splitlines()
                    if x.startswith('memdec_auto_memory_choices_total{memory="none"}'))
        return float(line.split()[-1])

    assert count(after) == count(before) + 1


def test_chat_and_stream_report_the_choice(med_law_server):
    body = {"messages": [{"role": "user", "content": TEXTS[0]}], "max_tokens": 2, "memory": "auto"}
    r = med_law_server.post("/v1/chat/completions", body)
    if r.status_code == 400:  # the tiny base has no chat template
        assert "template" in r.text
        return
    assert r.status_code == 200 and HEADER in r.headers
    assert r.json()["memory"] == (None if r.headers[HEADER] == "none" else r.headers[HEADER])


def test_stream_carries_the_header(med_law_server):
    r = med_law_server.post("/v1/completions",
                            {"prompt": TEXTS[1], "max_tokens": 2, "memory": "auto", "stream": True})
    assert r.status_code == 200 and HEADER in r.headers


@pytest.mark.parametrize("body,status,param", [
    ({"memory": "auto", "alpha": 0.5}, 400, "alpha"),
    ({"memory": "auto", "memory_temperature": 2.0}, 400, "memory_temperature"),
    ({"memory": "med", "memory_candidates": ["med"]}, 400, "memory_candidates"),
    ({"memory_candidates": ["med"]}, 400, "memory_candidates"),
    ({"memory": "auto", "memory_candidates": ["med", "nope"]}, 404, "memory_candidates"),
    ({"memory": "auto", "memory_candidates": ["med", "med"]}, 400, "memory_candidates"),
    ({"memory": "auto", "memory_candidates": "med"}, 400, "memory_candidates"),
    ({"memory": "auto", "model": "med"}, 400, "memory"),
])  # fmt: skip  # a table: one row per case
def test_auto_errors(med_law_server, body, status, param):
    assert_error(med_law_server.post("/v1/completions", {"prompt": TEXTS[0], **body}), status, param)


def test_perplexity_refuses_auto(med_law_server):
    assert_error(med_law_server.post("/v1/perplexity", {"input": TEXTS[0], "memory": "auto"}), 400, "memory")
