// Score mode: one text under one memory; the α slider re-colours and re-totals from the same answer.

import { showToken } from "./detail.js";
import { $, el } from "./dom.js";
import * as fmt from "./format.js";
import { curve, perplexity } from "./mix.js";
import { AlphaPlot } from "./plot.js";
import { scoreText } from "./scoring.js";
import { Task } from "./task.js";
import { TokenView } from "./tokens.js";

const ALTERNATIVES = 5; // each model's top tokens per position
const HINT =
  "Hover a token, or focus the text (Tab) and move with ← →; Home and End go to the first and last token, " +
  "PageDown and PageUp to the next token the memory helps most.";

export class ScoreView {
  constructor(text, onError) {
    this.text = text;
    this.doc = null;
    this.view = null;
    this.plot = null;
    this.frame = 0;
    this.task = new Task("score", (signal, task) => this.run(signal, task), onError);
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
    this.task.enabled = memories.length > 0;
    if (!memories.length) this.task.status("No memory is loaded on this server.");
  }

  async run(signal, task) {
    const text = this.text();
    if (!text.trim()) throw new Error("Paste a text (or open a file) first.");
    task.status("scoring…");
    const doc = await scoreText(text, $("score-memory").value, {
      alternatives: ALTERNATIVES,
      signal,
      onProgress: (done, total) => task.progress(done, total, `windows ${done} / ${total}`),
    });
    this.show(doc);
    return `scored under ${doc.memory}`;
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
    $("detail").replaceChildren(el("p", HINT, "hint"));
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
