"""Makes the memory lens screenshot in the docs (docs/images/lens-score.png) on the real demo.

It starts `memdec serve --port 8011` with no other flags, so the server serves the demo from ./demo
(SmolLM2-135M-Instruct and the biomed, legal and finance memories), and waits until `GET /ready` answers
200. Then it opens `/lens` in headless Chromium (Debian's package, driven by Playwright, as
tests/test_lens_page.py does) and, in Score mode, scores the first question and answer of
../shared/data/biomedical/valid.txt (MedQuAD, CC BY 4.0; 1,693 characters, whole) under the `biomed` memory.
It moves the α slider to ALPHA (higher than the memory's default, so that the colours show), focuses the
token the memory helps most at that α (asked of `/v1/perplexity` directly, with the same formula as the
page), so that the detail panel explains it, and saves the screenshot. The server is stopped at the end,
also when something fails.

Run it from the repository root (Chromium: `apt-get install chromium`, or set MEMDEC_CHROMIUM):

    .venv/bin/python demo/lens_screenshot.py

It prints the focused token and its probabilities under the base, the memory and the mixture, as the
panel shows them, for the caption in docs/lens.md.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import ConsoleMessage, Error, ViewportSize, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
PORT = 8011
URL = f"http://127.0.0.1:{PORT}"
MEMORY = "biomed"
ALPHA = 0.30  # the slider's value in the screenshot; the memory's default (0.01) barely colours anything
SOURCE = ROOT.parent / "shared" / "data" / "biomedical" / "valid.txt"
MAX_CHARS = 2000  # a longer answer is cut at its last sentence end before this many characters
OUTPUT = ROOT / "docs" / "images" / "lens-score.png"
VIEWPORT: ViewportSize = {"width": 1280, "height": 1632}  # the size of the screenshot it replaces
READY_TIMEOUT_S = 600.0


def chromium() -> str:
    path = os.environ.get("MEMDEC_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        sys.exit("chromium not found: apt-get install chromium, or set MEMDEC_CHROMIUM")
    return path


def sample() -> str:
    """The first question and its answer (the file's first two lines), the answer cut at a sentence end."""
    question, answer = SOURCE.read_text(encoding="utf-8").splitlines()[:2]
    if len(answer) > MAX_CHARS:
        cut = answer.rfind(". ", 0, MAX_CHARS)
        answer = answer[: cut + 1] if cut > 0 else answer[:MAX_CHARS]
    return f"{question}\n{answer}"


def wait_ready(server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"memdec serve exited with {server.returncode}:\n{tail(log)}")
        try:
            if httpx.get(f"{URL}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(1)
    raise RuntimeError(f"memdec serve not ready after {READY_TIMEOUT_S:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)  # its own process group: nothing else is touched
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def mix(base: float, memory: float, alpha: float) -> float:
    """log(α·p_mem + (1 − α)·p_base), as server/lens/mix.js computes it."""
    return math.log(alpha * math.exp(memory) + (1 - alpha) * math.exp(base))


def pick_token(text: str) -> tuple[int, dict[str, Any]]:
    """The word piece (3+ letters) the memory helps most at ALPHA: its index and its numbers."""
    body = {"input": text, "memory": MEMORY, "logprobs": 5}
    answer = httpx.post(f"{URL}/v1/perplexity", json=body, timeout=300).json()
    lp = answer["data"][0]["logprobs"]
    best, best_delta = -1, -math.inf
    for i, (piece, b, m) in enumerate(zip(lp["tokens"], lp["base"], lp["memory"], strict=True)):
        if b is None or sum(c.isalpha() for c in piece) < 3:
            continue
        delta = mix(b, m, ALPHA) - b
        if delta > best_delta:
            best, best_delta = i, delta
    b, m = lp["base"][best], lp["memory"][best]
    info = {"token": lp["tokens"][best], "base": b, "memory": m, "mix": mix(b, m, ALPHA), "delta": best_delta}
    return best, info


def screenshot(text: str, focus: int) -> dict[str, str]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport=VIEWPORT, color_scheme="light")
            page = context.new_page()
            problems: list[str] = []

            def on_console(message: ConsoleMessage) -> None:
                if message.type == "error":
                    problems.append(f"console: {message.text}")

            def on_error(error: Error) -> None:
                problems.append(f"uncaught: {error}")

            page.on("console", on_console)
            page.on("pageerror", on_error)
            page.goto(f"{URL}/lens")
            page.wait_for_selector("#app:not([hidden])")
            page.fill("#text", text)
            page.select_option("#score-memory", MEMORY)
            page.click("#score-run")
            page.wait_for_selector("#score-result:not([hidden])", timeout=300_000)
            page.wait_for_function("() => !document.querySelector('#score-run').disabled", timeout=300_000)
            # α with the keyboard, as a reader would: Home is 0, each → one step (0.01).
            page.focus("#alpha")
            page.keyboard.press("Home")
            for _ in range(round(ALPHA / 0.01)):
                page.keyboard.press("ArrowRight")
            page.wait_for_function(
                f"() => document.querySelector('#alpha-value').textContent === '{ALPHA:.2f}'"
            )
            page.focus(f"#tokens .tok[data-i='{focus}']")  # the detail panel follows the focus
            page.wait_for_selector("#detail .lp-mix")
            page.mouse.move(0, 0)  # no hover anywhere
            page.screenshot(path=str(OUTPUT))
            shown = {k: page.text_content(f"#detail .p-{k}") or "" for k in ("base", "memory", "mix")}
            shown["head"] = page.text_content("#detail h2") or ""
            shown["ppl"] = page.text_content("#plot-readout") or ""
            if problems:
                raise RuntimeError("the page reported problems: " + "; ".join(problems))
            return shown
        finally:
            browser.close()


def main() -> None:
    text = sample()
    log = Path(tempfile.mkstemp(prefix="lens-screenshot-", suffix=".log")[1])
    memdec = Path(sys.executable).parent / "memdec"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(memdec), "serve", "--port", str(PORT)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(server, log)
        focus, info = pick_token(text)
        shown = screenshot(text, focus)
    finally:
        stop(server)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(text)} characters scored under {MEMORY} at α {ALPHA:.2f})")
    print(f"focused token #{focus} {info['token']!r}: {shown['head']}")
    print(f"  panel p: base {shown['base']}, memory {shown['memory']}, mixture {shown['mix']}")
    print(f"  log p change {info['delta']:+.3f} nats; {shown['ppl']}")
    print(f"server log: {log}")


if __name__ == "__main__":
    main()
