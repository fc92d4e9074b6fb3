// How numbers and token text are written on the page, in one place.

export function logprob(x) {
  return x === null || x === undefined ? "–" : x.toFixed(3).replace("-", "−");
}

export function prob(lp) {
  if (lp === null || lp === undefined) return "–";
  const p = Math.exp(lp);
  return p >= 0.001 ? p.toFixed(3) : p.toExponential(1);
}

export function ppl(x) {
  if (!Number.isFinite(x)) return "–";
  return x < 100 ? x.toFixed(3) : x.toFixed(1);
}

export function alpha(a) {
  return Number(a).toFixed(2);
}

export function percent(x) {
  const s = (100 * x).toFixed(1);
  return (x > 0 ? "+" : "") + s.replace("-", "−") + "%";
}

/** A token's text with its whitespace made visible (for the detail panel, not the running text). */
export function visible(text) {
  if (text === "") return "(part of a character)";
  return text.replace(/ /g, "␣").replace(/\n/g, "⏎").replace(/\t/g, "⇥");
}
