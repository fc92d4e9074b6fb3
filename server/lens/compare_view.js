// Compare mode: the same text under every loaded memory at its default α, one coloured row each, so a
// domain's memory lights up on its own domain's text.

import { $, el } from "./dom.js";
import * as fmt from "./format.js";
import { perplexity } from "./mix.js";
import { scoreText } from "./scoring.js";
import { Task } from "./task.js";
import { TokenView } from "./tokens.js";

export class CompareView {
  constructor(text, onError) {
    this.text = text;
    this.memories = [];
    this.task = new Task("compare", (signal, task) => this.run(signal, task), onError);
  }

  setMemories(memories) {
    this.memories = memories;
    this.task.enabled = memories.length > 0;
  }

  async run(signal, task) {
    const text = this.text();
    if (!text.trim()) throw new Error("Paste a text (or open a file) first.");
    const rows = $("compare-rows");
    rows.replaceChildren();
    for (const [k, memory] of this.memories.entries()) {
      const doc = await scoreText(text, memory.id, {
        signal,
        onProgress: (done, total) =>
          task.progress(k * total + done, this.memories.length * total, `${memory.id}: windows ${done} / ${total}`),
      });
      rows.append(this.row(memory, doc));
    }
    return `${this.memories.length} memories compared`;
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
