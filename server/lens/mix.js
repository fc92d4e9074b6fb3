// The Memory Decoder mixture and perplexity, computed in the page from both models' per-token log-probs,
// so that the α slider needs no new request. The same formula as memories/mixing.py.

/** log(α·e^m + (1−α)·e^b): exactly the base at α = 0 and the memory at α = 1. */
export function mix(b, m, alpha) {
  if (alpha <= 0) return b;
  if (alpha >= 1) return m;
  const x = Math.log(alpha) + m;
  const y = Math.log1p(-alpha) + b;
  const hi = Math.max(x, y);
  return hi + Math.log(Math.exp(x - hi) + Math.exp(y - hi));
}

/** Perplexity of the scored tokens (entries that are null have no left context and are not scored). */
export function perplexity(base, memory, alpha) {
  let nll = 0;
  let n = 0;
  for (let i = 0; i < base.length; i++) {
    if (base[i] === null) continue;
    nll -= memory ? mix(base[i], memory[i], alpha) : base[i];
    n++;
  }
  return n ? Math.exp(nll / n) : NaN;
}

/** [α, perplexity] at `steps` + 1 evenly spaced α in [0, 1]. */
export function curve(base, memory, steps = 50) {
  const out = [];
  for (let k = 0; k <= steps; k++) out.push([k / steps, perplexity(base, memory, k / steps)]);
  return out;
}

export const SCALE_NATS = 3; // a change of this many nats (×20 in probability) gets the full colour

/** What the memory changes at one token: log p_mix − log p_base, and its colour strength in [0, 1]. */
export function change(b, m, alpha) {
  const delta = mix(b, m, alpha) - b;
  return { delta, strength: Math.min(Math.abs(delta) / SCALE_NATS, 1) };
}
