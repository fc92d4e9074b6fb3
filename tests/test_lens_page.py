"""The memory lens in a real headless Chromium (Debian's package, driven by Playwright) against a real
`memdec serve` with the tiny models: every number the page shows is checked against the API's own.

The page's Content-Security-Policy stays on (no `bypass_csp`), so a violation is a console error and fails
the test; for the same reason waits are given as functions ("() => ..."), which Playwright runs without
the `eval` the policy forbids.

Without Chromium the tests skip saying how to get it, except in CI (`CI` set), where `.ci/run` installs it and
a missing browser fails.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from memories.mixing import mix_scalar
from testkit.text import sample_text

playwright_api = pytest.importorskip("playwright.sync_api",
                                     reason="pip install playwright (the dev extra has it)")

API_KEY = "lens-secret"
SCALE_NATS = 3.0  # the page's full-colour change (server/lens/mix.js)
TEXT = sample_text("biomedical", 1800)  # ~900 tokens: several windows of 512 (stride 256), scored in 2 parts
PROMPT = "The patient was given"


def _chromium() -> str:
    path = os.environ.get("MEMDEC_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        message = "chromium not found: apt-get install chromium (.ci/run installs it), or set MEMDEC_CHROMIUM"
        if os.environ.get("CI"):  # CI installs it: a missing browser is a broken install step, not a skip
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])  # root in CI: no sandbox
        yield b
        b.close()


def _serve_args(zoo) -> list[str]:
    return ["--model", str(zoo.base), "--memory", f"med={zoo.mem_llama}",
            "--memory", f"law={zoo.mem_qwen_padded}",
            "--served-model-name", "tiny"]  # fmt: skip  # flag/value pairs on one line


@pytest.fixture(scope="module")
def server(zoo, live_server):
    with live_server("lens", _serve_args(zoo)) as s:
        yield s


class Page:
    """A browser tab on the lens that records console errors, failed requests and uncaught exceptions."""

    def __init__(self, browser: Any, url: str, scheme: str = "light") -> None:
        self.context = browser.new_context(viewport={"width": 1200, "height": 900}, color_scheme=scheme)
        self.page = self.context.new_page()
        self.url = url
        self.problems: list[str] = []
        self.refusals: set[int] = set()  # HTTP statuses a test provokes on purpose (Chromium logs each one)
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url}"))

    def open(self) -> Any:
        self.page.goto(self.url + "/lens")
        return self.page

    def close(self) -> None:
        self.context.close()

    def unexpected(self) -> list[str]:
        """Problems other than the console line Chromium writes for each refusal the test provoked."""
        codes = tuple(f"status of {code}" for code in self.refusals)
        return [p for p in self.problems
                if not (p.startswith("console:") and codes and any(c in p for c in codes))]


@pytest.fixture
def lens(browser, server) -> Iterator[Page]:
    page = Page(browser, server.url)
    page.open()
    yield page
    page.close()
    assert page.unexpected() == []


def api(server, path: str, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(server.url + path, json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def number(text: str) -> float:
    """A number as the page writes it (a real minus sign, exponent forms)."""
    return float(text.replace("−", "-"))


def shown_prob(logprob: float) -> Any:
    """A probability as the page rounds it: 3 decimals, or 2 significant digits below 0.001."""
    p = math.exp(logprob)
    return pytest.approx(p, abs=5.1e-4) if p >= 0.001 else pytest.approx(p, rel=0.051)


def token_state(page) -> list[dict[str, Any]]:
    """Every token span: its text, colour class and colour strength (the page's --a)."""
    return page.eval_on_selector_all(
        "#tokens .tok",
        """spans => spans.map(s => ({text: s.textContent, i: Number(s.dataset.i),
            help: s.classList.contains('help'), hurt: s.classList.contains('hurt'),
            unscored: s.classList.contains('unscored'), a: Number(s.style.getPropertyValue('--a') || 0)}))""",
    )


def score(page, memory: str) -> None:
    page.fill("#text", TEXT)
    page.select_option("#score-memory", memory)
    page.click("#score-run")
    page.wait_for_selector("#score-result:not([hidden])")
    page.wait_for_function("() => document.getElementById('score-status').textContent.startsWith('scored')")


def expected_colour(base: float, memory: float, alpha: float) -> tuple[bool, bool, float]:
    delta = mix_scalar(base, memory, alpha) - base
    return delta > 0, delta < 0, min(abs(delta) / SCALE_NATS, 1.0)


def assert_colours(page, lp: dict[str, Any], alpha: float) -> None:
    spans = token_state(page)
    assert len(spans) == len(lp["token_ids"])
    assert "".join(s["text"] for s in spans) == TEXT
    for s, b, m in zip(spans, lp["base"], lp["memory"], strict=True):
        if b is None:
            assert s["unscored"]
            continue
        help_, hurt, strength = expected_colour(b, m, alpha)
        assert (s["help"], s["hurt"]) == (help_, hurt), (s, b, m)
        assert s["a"] == pytest.approx(strength, abs=2e-3), (s, b, m)


def test_page_loads_and_lists_the_memories(lens, server):
    tab = lens.page
    tab.wait_for_selector("#app:not([hidden])")
    assert tab.text_content("#served") == "tiny with 2 memories"
    assert tab.eval_on_selector_all("#score-memory option", "os => os.map(o => o.value)") == ["med", "law"]
    assert tab.is_hidden("#key-form")
    tab.click("#score-run")  # nothing to score yet: the page says so, the server is not asked
    assert tab.text_content("#score-error") == "Paste a text (or open a file) first."
    home = httpx.get(server.url + "/").text
    assert 'href="lens"' in home


def test_scoring_colours_every_token_and_shows_the_api_numbers(lens, server):
    tab = lens.page
    score(tab, "med")
    whole = api(server, "/v1/perplexity", {"input": TEXT, "memory": "med", "logprobs": 5})
    doc = whole["data"][0]
    assert doc["num_windows"] > 1  # so the page scored it in parts
    lp, alpha = doc["logprobs"], whole["alpha"]
    assert tab.input_value("#alpha") == str(alpha)
    assert_colours(tab, lp, alpha)
    assert number(tab.text_content("#ppl-base")) == pytest.approx(doc["base_perplexity"], abs=0.06)
    assert number(tab.text_content("#ppl-memory")) == pytest.approx(doc["memory_perplexity"], abs=0.06)
    assert number(tab.text_content("#ppl-mix")) == pytest.approx(doc["perplexity"], abs=0.06)
    # Three tokens reached with the keyboard: the text is one tab stop, arrows move between tokens.
    tab.focus("#tokens .tok[tabindex='0']")
    position = 1
    for steps in (0, 40, 300):
        for _ in range(steps):
            tab.keyboard.press("ArrowRight")
            position += 1
            while lp["tokens"][position] == "":  # arrows skip tokens that are part of a character
                position += 1
        assert tab.evaluate("document.activeElement.dataset.i") == str(position)
        b, m = lp["base"][position], lp["memory"][position]
        shown = {k: number(tab.text_content(f"#detail .lp-{k}")) for k in ("base", "memory", "mix")}
        assert shown == {
            "base": pytest.approx(b, abs=6e-4),
            "memory": pytest.approx(m, abs=6e-4),
            "mix": pytest.approx(lp["mixed"][position], abs=6e-4),
        }, position
        rows = tab.eval_on_selector_all(
            "#detail table tr:not(:first-of-type)",
            "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
        )
        top = lp["top_logprobs"][position]
        assert len(rows) == len(top)  # distinct tokens of both models' top 5, ranked by the mixture at α
        for row, alt in zip(rows, top, strict=True):
            assert [number(v) for v in row[1:]] == [shown_prob(alt[k]) for k in ("base", "memory", "mixed")]


def test_alpha_slider_recolours_and_plots_the_api_perplexity(lens, server):
    tab = lens.page
    score(tab, "law")
    lp = api(server, "/v1/perplexity", {"input": TEXT, "memory": "law", "logprobs": 0})["data"][0]["logprobs"]
    tab.focus("#alpha")
    tab.keyboard.press("Home")
    tab.wait_for_function("() => document.getElementById('alpha-value').textContent === '0.00'")
    assert all(s["a"] == 0 for s in token_state(tab))  # α = 0 is the base: nothing changes
    for _ in range(35):
        tab.keyboard.press("ArrowRight")
    tab.wait_for_function("() => document.getElementById('alpha-value').textContent === '0.35'")
    assert_colours(tab, lp, 0.35)
    at = api(server, "/v1/perplexity", {"input": TEXT, "memory": "law", "alpha": [0.35, 0.0, 1.0]})["overall"]
    readout = tab.text_content("#plot-readout")
    plotted = number(re.search(r"perplexity at α 0\.35: ([\d.]+)", readout).group(1))
    assert plotted == pytest.approx(at["alphas"][0]["perplexity"], abs=0.06)
    assert number(tab.text_content("#ppl-mix")) == plotted
    marker = tab.eval_on_selector("#plot circle.current",
                                  "c => [Number(c.getAttribute('cx')), Number(c.getAttribute('cy'))]")
    tab.keyboard.press("End")
    tab.wait_for_function("() => document.getElementById('alpha-value').textContent === '1.00'")
    assert number(tab.text_content("#ppl-mix")) == pytest.approx(at["alphas"][2]["perplexity"], abs=0.06)
    moved = tab.eval_on_selector("#plot circle.current",
                                 "c => [Number(c.getAttribute('cx')), Number(c.getAttribute('cy'))]")
    assert moved[0] > marker[0]
    default_x = tab.eval_on_selector("#plot line.default", "l => Number(l.getAttribute('x1'))")
    assert default_x == pytest.approx(52 + 0.4 * (360 - 52 - 12), abs=0.1)  # law's default α is 0.4


def test_compare_scores_the_text_under_every_memory(lens, server):
    tab = lens.page
    tab.fill("#text", TEXT)
    tab.focus("#tab-score")
    tab.keyboard.press("ArrowRight")  # tabs move with the arrow keys
    assert tab.get_attribute("#tab-compare", "aria-selected") == "true" and tab.is_visible("#panel-compare")
    tab.click("#compare-run")
    tab.wait_for_function("() => document.getElementById('compare-status').textContent.endsWith('compared')")
    rows = tab.eval_on_selector_all(
        ".compare-row", "rs => rs.map(r => [r.dataset.memory, r.querySelector('.ppl').textContent])"
    )
    assert [r[0] for r in rows] == ["med", "law"]
    for name, text in rows:
        out = api(server, "/v1/perplexity", {"input": TEXT, "memory": name})["data"][0]
        base, mixed = (number(v) for v in re.search(r"perplexity ([\d.]+) → ([\d.]+)", text).groups())
        assert (base, mixed) == (pytest.approx(out["base_perplexity"], abs=0.06),
                                 pytest.approx(out["perplexity"], abs=0.06))
    strips = tab.eval_on_selector_all(".compare-row .tokens",
                                      "ss => ss.map(s => s.querySelectorAll('.help, .hurt').length)")
    assert all(n > 0 for n in strips)


def test_generate_streams_both_sides(lens, server):
    tab = lens.page
    tab.click("#tab-generate")
    assert tab.is_hidden("#text")  # generation has its own prompt
    tab.fill("#prompt", PROMPT)
    tab.select_option("#gen-memory", "law")
    assert tab.input_value("#gen-alpha") == "0.4"
    tab.fill("#gen-seed", "7")
    tab.fill("#gen-max", "12")
    streamed: list[str] = []
    tab.on("response",
           lambda r: r.url.endswith("/v1/completions") and streamed.append(r.headers["content-type"]))
    tab.click("#generate-run")
    for side in ("base", "mem"):
        tab.wait_for_function(
            f"() => document.getElementById('gen-{side}-status').textContent.startsWith('done')"
        )
    assert len(streamed) == 2 and all(t.startswith("text/event-stream") for t in streamed)
    common = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.8, "seed": 7}
    for side, extra in (("base", {"memory": None}), ("mem", {"memory": "law", "alpha": 0.4})):
        expected = api(server, "/v1/completions", {**common, **extra})["choices"][0]["text"]
        out = tab.text_content(f"#gen-{side}")
        assert out == PROMPT + expected, side
        assert int(tab.get_attribute(f"#gen-{side}", "data-chunks")) > 1, side  # arrived in pieces
    assert tab.text_content("#gen-base") != tab.text_content("#gen-mem")
    # A request the server refuses: its own message, and the mode is usable again.
    lens.refusals.add(400)
    tab.fill("#gen-max", "600")
    tab.click("#generate-run")
    tab.wait_for_function("() => document.getElementById('generate-error').textContent !== ''")
    assert "maximum context length is 512 tokens" in tab.text_content("#generate-error")
    assert tab.text_content("#gen-base-status") == tab.text_content("#gen-mem-status") == "failed"
    tab.wait_for_selector("#generate-run:not([disabled])")


def _luminance(rgb: tuple[float, float, float]) -> float:
    def channel(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _rgba(css: str) -> tuple[float, float, float, float]:
    parts = [float(v) for v in re.findall(r"[\d.]+", css)]
    return (parts[0], parts[1], parts[2], parts[3] if len(parts) > 3 else 1.0)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_text_is_readable_in_both_colour_schemes(browser, server, scheme):
    page = Page(browser, server.url, scheme)
    tab = page.open()
    score(tab, "med")
    colours = tab.evaluate(
        """() => {
        const style = (el) => getComputedStyle(el);
        const tok = document.querySelector('#tokens .tok.help')"""
        """ || document.querySelector('#tokens .tok.hurt');
        tok.style.setProperty('--a', '1');  // the strongest colour a token can get
        const hurt = document.querySelector('#tokens .tok.hurt');
        if (hurt) hurt.style.setProperty('--a', '1');
        return {bg: style(document.body).backgroundColor, fg: style(document.body).color,
                card: style(document.querySelector('.card')).backgroundColor,
                muted: style(document.querySelector('.hint')).color,
                tok: style(tok).backgroundColor, tokFg: style(tok).color,
                hurt: hurt ? style(hurt).backgroundColor : null};
    }"""
    )
    page.close()
    assert page.unexpected() == []
    card = _rgba(colours["card"])[:3]
    assert _contrast(_rgba(colours["fg"])[:3], card) >= 7
    assert _contrast(_rgba(colours["muted"])[:3], card) >= 4.5
    for key in ("tok", "hurt"):
        if colours[key] is None:
            continue
        r, g, b, a = _rgba(colours[key])
        shown = tuple(a * c + (1 - a) * k for c, k in zip((r, g, b), card, strict=True))  # over the card
        assert _contrast(_rgba(colours["tokFg"])[:3], shown) >= 4.5, (scheme, key, colours)


def test_a_wrong_api_key_shows_the_servers_message(browser, zoo, live_server):
    with live_server("lens-keyed", [*_serve_args(zoo), "--api-key", API_KEY]) as keyed:
        refusal = httpx.get(keyed.url + "/v1/models",
                            headers={"Authorization": "Bearer wrong"}).json()["error"]["message"]
        page = Page(browser, keyed.url)
        page.refusals.add(401)  # the page's first look, and the wrong key
        tab = page.open()
        tab.wait_for_selector("#key-form:not([hidden])")
        assert tab.is_hidden("#app") and tab.text_content("#key-error") == ""
        tab.fill("#key-input", "wrong")
        tab.keyboard.press("Enter")
        tab.wait_for_function("() => document.getElementById('key-error').textContent !== ''")
        assert tab.text_content("#key-error") == refusal
        tab.fill("#key-input", API_KEY)
        tab.keyboard.press("Enter")
        tab.wait_for_selector("#app:not([hidden])")
        assert tab.evaluate("sessionStorage.getItem('memdec.apiKey')") == API_KEY
        score(tab, "med")  # every request carries the key
        tab.reload()  # kept for the tab: not asked again
        tab.wait_for_selector("#app:not([hidden])")
        assert tab.is_hidden("#key-form")
        tab.click("#forget-key")
        tab.wait_for_selector("#key-form:not([hidden])")
        page.close()
    assert page.unexpected() == []
