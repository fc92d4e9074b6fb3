// Scores a text under one memory with /v1/perplexity's per-token log-probs, in parts of a few windows
// each (first_window, max_windows), so that long texts show progress and every answer stays small.
// The parts together are exactly the whole text's sliding-window scores.

import { call } from "./api.js";

const PART_TOKENS = 2048; // scored tokens per request (the server allows up to 16384)

/**
 * Resolves to {memory, alpha, pieces, ids, base, memory_lp, top}: one entry per token of the text;
 * base/memory_lp are null for the first token (nothing before it to predict it from).
 * onProgress(done, total) is called after each part with windows scored so far.
 */
export async function scoreText(text, memory, { alternatives = 0, onProgress = () => {}, signal } = {}) {
  const doc = { memory, alpha: null, pieces: [], ids: [], base: [], memory_lp: [], top: [] };
  const body = { input: text, memory, logprobs: alternatives };
  let first = 0;
  let count = 1; // the first part is one window: its answer tells how many windows the text has
  let total = 1;
  while (first < total) {
    const answer = await call("v1/perplexity", { ...body, first_window: first, max_windows: count }, signal);
    const part = answer.data[0];
    doc.alpha = answer.alpha;
    append(doc, part.logprobs);
    total = part.num_windows;
    first += count;
    count = Math.max(1, Math.floor(PART_TOKENS / answer.stride));
    onProgress(Math.min(first, total), total);
  }
  return doc;
}

function append(doc, lp) {
  doc.pieces.push(...lp.tokens);
  doc.ids.push(...lp.token_ids);
  doc.base.push(...lp.base);
  doc.memory_lp.push(...lp.memory);
  if (lp.top_logprobs) doc.top.push(...lp.top_logprobs);
}
