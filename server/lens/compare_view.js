// Compare mode: the same text under every loaded memory at its default α, one coloured row each, so a
// domain's memory lights up on its own domain's text.

import * as fmt from "./format.js";
import { perplexity } from "./mix.js";
import { scoreText } from "./scoring.js";
import { TokenView } from "./tokens.js";

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

export class CompareView {
  constructor(text, onError) {
    this.text = text;
    this.onError = onError;
    this.memories = [];
    this.controller = null;
    $("compare-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.run();
    });
    $("compare-stop").addEventListener("click", () => this.controller?.abort());
  }

  setMemories(memories) {
    this.memories = memories;
    $("compare-run").disabled = memories.length === 0;
  }

  async run() {
    const text = this.text();
    if (!text.trim()) {
      $("compare-error").textContent = "Paste a text (or open a file) first.";
      return;
    }
    $("compare-error").textContent = "";
    const rows = $("compare-rows");
    rows.replaceChildren();
    this.controller = new AbortController();
    const progress = $("compare-progress");
    progress.hidden = false;
    $("compare-run").disabled = true;
    $("compare-stop").hidden = false;
    try {
      for (const [k, memory] of this.memories.entries()) {
        const doc = await scoreText(text, memory.id, {
          signal: this.controller.signal,
          onProgress: (done, total) => {
            progress.max = this.memories.length * total;
            progress.value = k * total + done;
            $("compare-status").textContent = `${memory.id}: windows ${done} / ${total}`;
          },
        });
        rows.append(this.row(memory, doc));
      }
      $("compare-status").textContent = `${this.memories.length} memories compared`;
    } catch (err) {
      $("compare-status").textContent = "";
      if (err.name !== "AbortError") this.onError(err, $("compare-error"));
    } finally {
      progress.hidden = true;
      $("compare-run").disabled = false;
      $("compare-stop").hidden = true;
    }
  }

  row(memory, doc) {
    const base = perplexity(doc.base, null, 0);
    const mixed = perplexity(doc.base, doc.memory_lp, doc.alpha);
    const change = mixed / base - 1;
    const card = el("section", undefined, "card compare-row");
    card.dataset.memory = memory.id;
    const title = el("h3");
    title.append(
      el("span", memory.id),
      el("span", memory.domain || "", "nums"),
      el("span", `α ${fmt.alpha(doc.alpha)} · perplexity ${fmt.ppl(base)} → ${fmt.ppl(mixed)}`, "nums ppl"),
      el("span", fmt.percent(change), change < 0 ? "better change" : "worse change"),
    );
    const strip = el("div", undefined, "tokens small");
    new TokenView(strip, doc, null).colour(doc.alpha);
    card.append(title, strip);
    return card;
  }
}
