// Score mode: one text under one memory; the α slider re-colours and re-totals from the same answer.

import { showToken } from "./detail.js";
import * as fmt from "./format.js";
import { curve, perplexity } from "./mix.js";
import { AlphaPlot } from "./plot.js";
import { scoreText } from "./scoring.js";
import { TokenView } from "./tokens.js";

const ALTERNATIVES = 5; // each model's top tokens per position
const HINT =
  "Hover a token, or focus the text (Tab) and move with ← →; Home and End go to the first and last token, " +
  "PageDown and PageUp to the next token the memory helps most.";

const $ = (id) => document.getElementById(id);

export class ScoreView {
  constructor(text, onError) {
    this.text = text;
    this.onError = onError;
    this.doc = null;
    this.view = null;
    this.plot = null;
    this.controller = null;
    this.frame = 0;
    $("score-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.run();
    });
    $("score-stop").addEventListener("click", () => this.controller?.abort());
    $("alpha").addEventListener("input", () => {
      cancelAnimationFrame(this.frame); // re-colour at most once per frame while dragging
      this.frame = requestAnimationFrame(() => this.update());
    });
  }

  setMemories(memories) {
    const select = $("score-memory");
    select.replaceChildren(
      ...memories.map((m) => new Option(`${m.id}${m.domain ? ` (${m.domain})` : ""} · α ${fmt.alpha(m.alpha)}`, m.id)),
    );
    $("score-run").disabled = memories.length === 0;
    if (!memories.length) $("score-status").textContent = "No memory is loaded on this server.";
  }

  async run() {
    const text = this.text();
    if (!text.trim()) {
      $("score-error").textContent = "Paste a text (or open a file) first.";
      return;
    }
    $("score-error").textContent = "";
    const progress = $("score-progress");
    this.controller = new AbortController();
    progress.hidden = false;
    progress.value = 0;
    $("score-run").disabled = true;
    $("score-stop").hidden = false;
    $("score-status").textContent = "scoring…";
    try {
      const doc = await scoreText(text, $("score-memory").value, {
        alternatives: ALTERNATIVES,
        signal: this.controller.signal,
        onProgress: (done, total) => {
          progress.max = total;
          progress.value = done;
          $("score-status").textContent = `windows ${done} / ${total}`;
        },
      });
      this.show(doc);
      $("score-status").textContent = `scored under ${doc.memory}`;
    } catch (err) {
      $("score-status").textContent = "";
      if (err.name !== "AbortError") this.onError(err, $("score-error"));
    } finally {
      progress.hidden = true;
      $("score-run").disabled = false;
      $("score-stop").hidden = true;
    }
  }

  show(doc) {
    this.doc = doc;
    $("score-result").hidden = false;
    const slider = $("alpha");
    slider.value = String(doc.alpha);
    $("alpha-default").textContent = `the memory's default: ${fmt.alpha(doc.alpha)}`;
    this.view = new TokenView($("tokens"), doc, (i) => showToken($("detail"), doc, i, Number(slider.value)));
    this.plot = new AlphaPlot($("plot"), curve(doc.base, doc.memory_lp), doc.alpha);
    const scored = doc.base.filter((b) => b !== null).length;
    $("token-count").textContent = `${scored} tokens scored (${doc.pieces.length} in the text)`;
    $("ppl-base").textContent = fmt.ppl(perplexity(doc.base, null, 0));
    $("ppl-memory").textContent = fmt.ppl(perplexity(doc.base, doc.memory_lp, 1));
    const hint = document.createElement("p");
    hint.className = "hint";
    hint.textContent = HINT;
    $("detail").replaceChildren(hint);
    this.update();
  }

  update() {
    const { doc } = this;
    if (!doc) return;
    const alpha = Number($("alpha").value);
    $("alpha-value").textContent = fmt.alpha(alpha);
    this.view.colour(alpha);
    const base = perplexity(doc.base, null, 0);
    const mixed = perplexity(doc.base, doc.memory_lp, alpha);
    $("ppl-mix-alpha").textContent = `α ${fmt.alpha(alpha)}`;
    $("ppl-mix").textContent = fmt.ppl(mixed);
    $("ppl-change").textContent = fmt.percent(mixed / base - 1);
    this.plot.mark(alpha, mixed);
    const [bestAlpha, bestPpl] = this.plot.best;
    $("plot-readout").textContent =
      `perplexity at α ${fmt.alpha(alpha)}: ${fmt.ppl(mixed)} · lowest at α ${fmt.alpha(bestAlpha)}: ${fmt.ppl(bestPpl)}`;
    if (this.view.active >= 0) showToken($("detail"), doc, this.view.active, alpha);
  }
}
