// The panel that explains one token: its probability under the base, the memory and the mixture at the
// current α, and what each would have put there instead.

import { el } from "./dom.js";
import * as fmt from "./format.js";
import { mix } from "./mix.js";

function values(b, m, mixed) {
  const grid = el("div", undefined, "values");
  for (const head of ["", "base", "memory", `mixture`]) grid.append(el("span", head));
  grid.append(el("span", "p"), el("span", fmt.prob(b), "p-base"), el("span", fmt.prob(m), "p-memory"), el("span", fmt.prob(mixed), "p-mix"));
  grid.append(
    el("span", "log p"),
    el("span", fmt.logprob(b), "lp-base"),
    el("span", fmt.logprob(m), "lp-memory"),
    el("span", fmt.logprob(mixed), "lp-mix"),
  );
  return grid;
}

/** Alternatives: the union of both models' top tokens, ranked by the mixture at α. */
function alternatives(candidates, actualId, alpha) {
  const rows = candidates
    .map((c) => ({ ...c, at: mix(c.base, c.memory, alpha) }))
    .sort((x, y) => y.at - x.at);
  const table = el("table", undefined, "alternatives");
  const head = el("tr");
  for (const h of ["instead", "base", "memory", "mixture"]) head.append(el("th", h));
  table.append(el("caption", "Probability of each model's top tokens, ranked by the mixture"), head);
  for (const r of rows) {
    const tr = el("tr", undefined, r.token_id === actualId ? "actual" : "");
    tr.append(el("td", fmt.visible(r.token), "t"), el("td", fmt.prob(r.base)), el("td", fmt.prob(r.memory)), el("td", fmt.prob(r.at)));
    table.append(tr);
  }
  return table;
}

export function showToken(panel, doc, i, alpha) {
  const b = doc.base[i];
  const head = el("h2");
  head.append("Token ", el("span", fmt.visible(doc.pieces[i]), "t"), ` #${i}`);
  if (b === null) {
    panel.replaceChildren(head, el("p", "The first token has no log-prob: nothing comes before it.", "hint"));
    return;
  }
  const m = doc.memory_lp[i];
  const mixed = mix(b, m, alpha);
  const delta = mixed - b;
  const verdict = el("p", undefined, "hint");
  verdict.append(
    `At α = ${fmt.alpha(alpha)} the memory ${delta >= 0 ? "helps" : "hurts"}: log p changes by `,
    el("strong", fmt.logprob(delta), "delta"),
    ` nats (×${Math.exp(delta).toPrecision(3)} in probability).`,
  );
  const parts = [head, values(b, m, mixed), verdict];
  if (doc.top[i]) parts.push(alternatives(doc.top[i], doc.ids[i], alpha));
  panel.replaceChildren(...parts);
}
